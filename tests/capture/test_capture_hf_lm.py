"""``integrations.hf.log_causal_lm`` logs the exact per-sequence gradient for left and right padding.

Reference: each sequence alone (batch size 1, its own padding and attention mask) through the same model
and ``causal_lm_loss`` with Hugging Face labels (−100 on padding), ``param.grad`` read back. With left
padding the last pad position predicts the first real token: that term is part of the loss and must be
in the logged gradient (the issue's 0.4–0.5 relative error came from masking it away).
"""

import pytest
import torch
from capture_reference import assert_grads_match, make_analog, tied_sums

from analog.integrations.hf import causal_lm_loss, log_causal_lm

transformers = pytest.importorskip("transformers")

B, T, V = 3, 7, 48


def padded(side: str):
    torch.manual_seed(1)
    ids = torch.randint(1, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = [T, 5, 3]
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, n:] = 0
        else:
            mask[i, : T - n] = 0
    return ids * mask, mask


def reference(model, ids, mask):
    out = {}
    for i in range(B):
        model.zero_grad(set_to_none=True)
        labels = ids[i:i + 1].masked_fill(mask[i:i + 1] == 0, -100)
        causal_lm_loss(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits, labels).backward()
        for k, p in model.named_parameters():
            out.setdefault(k, []).append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_log_causal_lm_is_exact(tmp_path, side):
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids, mask = padded(side)
    analog = make_analog(tmp_path, save=True)
    analog.watch(model)
    log_causal_lm(analog, model, [{"input_ids": ids[:2], "attention_mask": mask[:2], "ids": [0, 1]},
                                  {"input_ids": ids[2:], "attention_mask": mask[2:], "ids": [2]}], progress=False)
    analog.finalize()
    store = analog.open_store()
    stored_ids, logs = store.batch(0, len(store))
    assert stored_ids == [0, 1, 2]
    got = {}
    for name, kinds in logs.items():
        for pname, g in analog.rules[name].param_grads(analog.modules[name], kinds["grad"]).items():
            got[f"{name}.{pname}"] = g
    got = tied_sums(model, got)
    ref = reference(model, ids, mask)
    assert len(got) == len(ref)  # default watch covers every parameter of the Llama
    assert assert_grads_match(got, ref) == len(ref)
    # the mask alone would have changed the answer: without the left pad's term the error is large
    if side == "left":
        assert ref["model.embed_tokens.weight"][2].abs().sum() > 0
