"""How the store's number code changes self-influence, per curvature (a tiny GPT-2 from a config, random tokens).

Self-influence s_n = g̃_nᵀ (F + λI)⁻¹ g̃_n is a quadratic form of the stored row, so a code's error e_n does not
average out as in a score against a float query: it adds e_nᵀ M e_n (M = (F + λI)⁻¹), which is large where M is
anisotropic and the error spreads over the directions M amplifies (int2's rotation spreads it evenly). For each
dtype and curvature this prints the Spearman rank correlation and the median ratio of self-influence to the
float32 store's, and for int2 the same after subtracting the isotropic-noise estimate
κ · ‖x̂_m‖² · tr(M_m) / k_m per module (κ = 0.1175 / 0.8825, the Lloyd–Max code's error over its kept energy):
how much of the change that estimate explains. Results: benchmarks/results/self_influence_codes.md.

    python -m benchmarks.bench_self_influence_codes [--n 96] [--epochs 2] [--hessians kfac ekfac raw none]
"""

import argparse
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.analysis.evaluation import spearman as column_spearman

KAPPA = 0.1175 / 0.8825


def build(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=32))


def seq_loss(model, x):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")


def self_influence(root, dtype, hessian, data, epochs, batch=8):
    """(ids, self-influence (N,), noise estimate (N,)) of a project logged while training ``epochs`` epochs
    (the last epoch's segment is scored)."""
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = AnaLog(f"{dtype}_{hessian}", {"root_dir": root, "hessian": hessian, "storage": {"dtype": dtype},
                                        "progress": False})
    run.watch(model)
    for _ in range(epochs):
        for i in range(0, len(data), batch):
            with run(data_id=list(range(i, i + batch))):
                seq_loss(model, data[i:i + batch]).backward()
            opt.step()
            opt.zero_grad()
    run.finalize()
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    ids, scores = run.influence.compute_self_influence(run.build_log_dataloader())
    noise = torch.zeros(len(ids), dtype=torch.float64)
    if dtype == "int2":  # κ ‖x̂_m‖² tr(M_m) / k_m per module, from the stored rows and the fitted curvature
        store = run.open_store()
        if list(store.ids) != list(ids):
            raise RuntimeError("the store's row order differs from the self-influence ids")
        for name, logs in store.split(store.rows(0, len(store))).items():
            g = logs["grad"].double()
            k = g[0].numel()
            eye = torch.eye(k, dtype=torch.float64).reshape(k, *g.shape[1:])
            trace = run.curvature.precondition(name, eye).reshape(k, k).diagonal().sum().item()
            noise += KAPPA * g.reshape(len(g), -1).pow(2).sum(1) * trace / k
    return list(ids), scores.double(), noise


def spearman(a, b) -> float:
    """Spearman correlation of two (N,) vectors (analog.analysis.evaluation.spearman, ties averaged)."""
    return float(column_spearman(a[:, None], b[:, None])[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--hessians", nargs="+", default=["kfac", "ekfac", "raw", "none"])
    p.add_argument("--dtypes", nargs="+", default=["int8", "int4", "int2"])
    args = p.parse_args()
    torch.set_num_threads(1)
    data = torch.randint(0, 500, (args.n, 32), generator=torch.Generator().manual_seed(1))
    print(f"machine: {platform.machine()}, torch {torch.__version__}; N = {args.n}, {args.epochs} epochs")
    print("| hessian | dtype | Spearman vs float32 | median ratio | int2 minus noise estimate: Spearman / ratio |")
    print("|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as root:
        for hessian in args.hessians:
            t = time.time()
            ids0, ref, _ = self_influence(root, "float32", hessian, data, args.epochs)
            for dtype in args.dtypes:
                ids, s, noise = self_influence(root, dtype, hessian, data, args.epochs)
                assert ids == ids0, "ids differ between stores"
                extra = ""
                if dtype == "int2":
                    c = s - noise
                    extra = f"{spearman(c, ref):.3f} / {(c / ref).median().item():.2f}"
                print(f"| {hessian} | {dtype} | {spearman(s, ref):.3f} | {(s / ref).median().item():.2f} | {extra} |",
                      flush=True)
            print(f"<!-- {hessian}: {time.time() - t:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
