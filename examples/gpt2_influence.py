"""Which training sequences made a small GPT-2 say what it said?

A GPT-2-style model (built from a config, random init, no download) is trained briefly on
``examples/data/tiny_corpus.txt`` with a character vocabulary; it then completes a prompt, and
analog finds the training sequences most and least influential for that completion (LoGra rank 16,
K-FAC). Padding of the last sequence is masked out of the logs.

    python examples/gpt2_influence.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.integrations.hf import causal_lm_loss, log_causal_lm, query_causal_lm

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


def encode_corpus(seq_len: int):
    text = CORPUS.read_text(encoding="utf-8")
    vocab = ["<pad>"] + sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([stoi[c] for c in text])
    n = (len(ids) + seq_len - 1) // seq_len
    seqs = torch.zeros(n, seq_len, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    for i in range(n):
        chunk = ids[i * seq_len : (i + 1) * seq_len]
        seqs[i, : len(chunk)], mask[i, : len(chunk)] = chunk, 1
    return seqs, mask, vocab, stoi


def train(model, seqs, mask, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(seqs), (16,), generator=gen)
        labels = seqs[idx].masked_fill(mask[idx] == 0, -100)
        loss = causal_lm_loss(model(input_ids=seqs[idx], attention_mask=mask[idx]).logits, labels)
        opt.zero_grad()
        (loss / (mask[idx].sum())).backward()
        opt.step()


@torch.no_grad()
def complete(model, prompt: str, stoi, vocab, n: int) -> str:
    ids = torch.tensor([[stoi[c] for c in prompt]])
    for _ in range(n):
        nxt = model(input_ids=ids[:, -model.config.n_positions :]).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return "".join(vocab[i] for i in ids[0].tolist())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompt", default="The baker")
    parser.add_argument("--root", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    seqs, mask, vocab, stoi = encode_corpus(args.seq_len)
    config = GPT2Config(vocab_size=len(vocab), n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    train(model, seqs, mask, args.steps)
    model.eval()  # attribution passes must be deterministic: no dropout
    text = complete(model, args.prompt, stoi, vocab, args.seq_len - len(args.prompt))
    print(f"completion: {text!r}")

    run = AnaLog("gpt2", {"root_dir": args.root or tempfile.mkdtemp(prefix="analog-gpt2-"),
                          "compression": {"type": "logra", "rank": 16}})
    run.update({"log": ["grad"], "hessian": "kfac", "save": True})
    run.watch(model, name_filter=["transformer.h."])  # the Conv1D layers of every block
    batches = [{"input_ids": seqs[i : i + 8], "attention_mask": mask[i : i + 8],
                "ids": list(range(i, min(i + 8, len(seqs))))} for i in range(0, len(seqs), 8)]
    log_causal_lm(run, model, batches)
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})

    query = torch.tensor([[stoi[c] for c in text]])
    top = run.influence.compute_influence_all(query_causal_lm(run, model, query)).topk(3)
    decode = lambda i: "".join(vocab[t] for t, m in zip(seqs[i].tolist(), mask[i].tolist()) if m)  # noqa: E731
    print("most helpful training sequences:")
    for i in top["helpful"][0]:
        print(f"  #{i}: {decode(i)!r}")
    print("most harmful training sequences:")
    for i in top["harmful"][0]:
        print(f"  #{i}: {decode(i)!r}")


if __name__ == "__main__":
    main()
