"""Offline probe: a per-example truncated SVD of each whitened per-sequence gradient (and the top tokens' (δ_t, a_t)
pairs) against a Kronecker random sketch + raw, at the same numbers per module (CPU preset LM).

    python -m benchmarks.attribution_lm.probe_svd [cache dir]

The SVD keeps ρ = budget // (d_out + d_in) rank-one terms σ_j u_j v_jᵀ of G̃ = R_S G R_A (the best rank-ρ
approximation); scores are ⟨Q̃, G̃_ρ⟩ with the query whitened and uncompressed. Results: sketch_probe.md §5.
"""

import math
import sys
import time
import zlib

import numpy as np
import torch

from benchmarks.attribution_lm.probe import captured_cpu_lm, kfac_whitener, raw_scores

torch.set_num_threads(2)
task, train, query = captured_cpu_lm(sys.argv[1] if len(sys.argv) > 1 else "outputs/attribution_lm")
corpus = task.corpus
WHITEN = {n: kfac_whitener(*train[n]) for n in train}
W = {n: WHITEN[n](*train[n]) for n in train}
WQ = {n: WHITEN[n](*query[n]) for n in train}
G = {n: torch.einsum("nto,nti->noi", d, a) for n, (d, a) in W.items()}
Q = {n: torch.einsum("nto,nti->noi", d, a) for n, (d, a) in WQ.items()}
print({n: tuple(g.shape[1:]) for n, g in G.items()})
SV = {n: torch.linalg.svd(g, full_matrices=False) for n, g in G.items()}


def quant(x, how):
    if how == "fp32":
        return x
    L = 127 if how == "int8" else 7
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / L
    return torch.round(x / s).clamp(-L, L) * s


def ev(scores):
    return task.evaluate(scores.numpy())


def show(name, res, t):
    print(
        f"{name:40s} recall@2 {res['recall@2']:.3f} mrr {res['mrr']:.3f} "
        f"lds {res.get('lds', float('nan')):.3f} ({time.time() - t:.1f}s)",
        flush=True,
    )


t = time.time()
show("full white dot (K-FAC-ish)", ev(sum(Q[n].flatten(1) @ G[n].flatten(1).T for n in G)), t)
# energy captured
for rho in (1, 2, 4, 8):
    e = np.mean([float((SV[n][1][:, :rho] ** 2).sum() / (SV[n][1] ** 2).sum()) for n in G])
    print(f"rank {rho}: mean energy fraction {e:.3f}")


def svd_scores(budget, how):
    total = 0
    for n in G:
        U, s, Vh = SV[n]
        do, di = U.shape[1], Vh.shape[2]
        rho = max(1, budget // (do + di))
        u = quant(U[:, :, :rho].transpose(1, 2) * s[:, :rho, None], how)  # (N, rho, do)
        v = quant(Vh[:, :rho, :], how)  # (N, rho, di)
        gr = torch.einsum("njo,nji->noi", u, v)
        total = total + Q[n].flatten(1) @ gr.flatten(1).T
    return total


def tokens_scores(budget, how):  # keep the top tokens' (d, a) pairs by |d||a|
    total = 0
    for n in G:
        d, a = W[n]
        rho = max(1, budget // (d.shape[-1] + a.shape[-1]))
        w = d.norm(dim=-1) * a.norm(dim=-1)
        idx = w.topk(rho, dim=1).indices
        dd = torch.gather(d, 1, idx[..., None].expand(-1, -1, d.shape[-1]))
        aa = torch.gather(a, 1, idx[..., None].expand(-1, -1, a.shape[-1]))
        gr = torch.einsum("nto,nti->noi", quant(dd, how), quant(aa, how))
        total = total + Q[n].flatten(1) @ gr.flatten(1).T
    return total


def kron_scores(k, how, seed=0, raw=True):
    total = 0
    for n in G:
        gen = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(n.encode()) % 997)
        (d, a), (dq, aq) = W[n], WQ[n]
        r = int(round(math.sqrt(k)))
        po = torch.randn(d.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
        pi = torch.randn(a.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
        xt = quant(torch.einsum("ntr,nts->nrs", d @ po, a @ pi).flatten(1), how)
        xq = torch.einsum("ntr,nts->nrs", dq @ po, aq @ pi).flatten(1)
        total = total + (raw_scores(xq, xt) if raw else xq @ xt.T)
    return total


for budget, how in ((256, "fp32"), (1024, "int8"), (2048, "int4")):
    t = time.time()
    show(f"kron white raw k={budget} {how}", ev(kron_scores(budget, how)), t)
    t = time.time()
    show(f"svd budget={budget} {how}", ev(svd_scores(budget, how)), t)
    t = time.time()
    show(f"tokens budget={budget} {how}", ev(tokens_scores(budget, how)), t)
