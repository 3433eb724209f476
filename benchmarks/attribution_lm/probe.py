"""Which sketch of a per-sequence gradient keeps fact tracing: exact per-token gradients, sketches offline.

    python -m benchmarks.attribution_lm.probe --width 128 --epochs 30

Captures, for every attributed Linear of the benchmark LM, the per-token layer inputs a_t (with a 1 for
the bias) and output gradients δ_t of every training sequence (summed next-token loss) and of every query
(answer loss); the per-sequence gradient is G = Σ_t δ_t a_tᵀ. Each sketch maps G (per module) to k
numbers; scores are the ``raw`` curvature of analog on the sketches (per module (C + λI)⁻¹, C the
sketches' second moment, λ = 0.1 × its mean eigenvalue), summed over modules; recall@2 and MRR as the
benchmark computes them. Nothing of analog is used: this measures the sketches, not the library.
"""

from __future__ import annotations

import argparse
import math
import time
import zlib

import numpy as np
import torch

from benchmarks.attribution_lm.model import answer_loss
from benchmarks.attribution_lm.run import build_lm


def other_relation_queries(corpus, limit=256):
    """Queries of the relations the benchmark never asks (works, likes), cut from their training statements:
    ``<bos>`` + the statement up to its answer; the loss is the answer token's."""
    dot = corpus.vocab.index(".")
    rows, pos = [], []
    for i in np.flatnonzero(np.isin(corpus.kinds, ["works", "likes"]))[:limit]:
        seq = corpus.train_tokens[i].tolist()
        end = seq.index(dot)
        rows.append(seq[:end])
        pos.append(end - 2)
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows]), torch.tensor(pos)


def capture(task, tokens_batches, loss_fn):
    """Per module: (δ (N, T, d_out), a (N, T, d_in + 1)) over the batches."""
    model = task.fresh_model()
    store = {}
    handles = []

    def hook(name):
        def fwd(mod, inp, out):
            a = inp[0].detach()
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
            store.setdefault(name, {"a": [], "d": []})["a"].append(a)
            out.register_hook(lambda g: store[name]["d"].append(g.detach()))
        return fwd

    for name, mod in model.named_modules():
        if name in task.modules:
            handles.append(mod.register_forward_hook(hook(name)))
    for batch in tokens_batches:
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    return {n: (torch.cat(v["d"]).double(), torch.cat(v["a"]).double()) for n, v in store.items()}


DEV = "cpu"


def randn(*shape, generator, dtype):
    return torch.randn(*shape, generator=generator, dtype=dtype).to(DEV)


def root_inv(m, lam):
    e, v = torch.linalg.eigh(m)
    return (v * (e.clamp_min(0) + lam).rsqrt()) @ v.T


def captured_cpu_lm(cache, preset="cpu"):
    """(task, train, query) for the offline probes: the ``preset`` LM (``cpu`` or ``cpu4k``) with its 50
    retrained halves (from ``cache``) and ``capture`` of every training sequence (summed loss) and every fact
    query (answer loss)."""
    from pathlib import Path

    task = build_lm(preset, "cpu", Path(cache), False, {"model": {}, "subsets": 50}, min_accuracy=0.5)
    train = capture(task, [b for _, b in task.train_batches()], task.train_loss)
    query = capture(task, [task.corpus.query_tokens], lambda m, b: task.query_loss(m))
    return task, train, query


def kfac_whitener(d, a):
    """(δ, a) -> (δ S_λ^{-1/2}, a A_λ^{-1/2}) with the per-token factors of training (δ (N, T, d_out), a):
    A = mean over positions of a aᵀ, S = the same of δ δᵀ, each damped by √0.1 × its mean eigenvalue (as
    ``whitened`` in ``main``)."""
    A = torch.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
    S = torch.einsum("nti,ntj->ij", d, d) / (d.shape[0] * d.shape[1])
    ra = root_inv(A, math.sqrt(0.1) * A.trace() / len(A))
    rs = root_inv(S, math.sqrt(0.1) * S.trace() / len(S))
    return lambda d_, a_: (d_ @ rs, a_ @ ra)


NORMALISE = False  # --normalise: unit-norm whitened query gradients in the query Grams
FRAC = 0.1  # raw's damping: FRAC × the mean eigenvalue of the sketches' second moment (--frac)


def raw_scores(xq, xt, frac=None):
    frac = FRAC if frac is None else frac
    c = xt.T @ xt / len(xt)
    lam = frac * torch.trace(c) / len(c)
    sol = torch.linalg.solve(c + lam * torch.eye(len(c), dtype=c.dtype, device=c.device), xt.T)  # (k, N)
    return xq @ sol


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--only", nargs="*")
    p.add_argument("--plan", default="bytes",
                   choices=["bytes", "structure", "gpu", "mix", "query", "query_gpu", "alloc"])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--normalise", action="store_true", help="unit-norm query gradients in the query Grams")
    p.add_argument("--frac", type=float, default=0.1, help="raw damping as a fraction of the mean eigenvalue")
    p.add_argument("--device", default="cpu")
    p.add_argument("--subsets", type=int, default=2, help="retrained halves for the LDS (2: recall only)")
    args = p.parse_args()
    global DEV, FRAC, NORMALISE
    DEV, FRAC, NORMALISE = args.device, args.frac, args.normalise
    torch.set_num_threads(2)
    model = {"d_model": args.width, "d_ff": 2 * args.width} if args.width else {}
    model.update({"epochs": args.epochs} if args.epochs else {})
    overrides = {"model": model, "subsets": args.subsets}
    task = build_lm(args.preset, args.device, __import__("pathlib").Path("outputs/attribution_lm"), False, overrides,
                    min_accuracy=0.5)
    corpus = task.corpus
    t0 = time.time()
    train = capture(task, [b for _, b in task.train_batches()], task.train_loss)
    q = corpus.query_tokens
    query = capture(task, [q], lambda m, b: task.query_loss(m))
    calib_tokens, calib_pos = other_relation_queries(corpus)
    calib = capture(task, [calib_tokens], lambda m, b: answer_loss(m(b.to(task.device)), b.to(task.device),
                                                                   calib_pos.to(task.device)).sum())
    print(f"calibration: {len(calib_pos)} queries of other relations (works, likes)")
    print(f"captured in {time.time() - t0:.1f} s; modules {list(train)}", flush=True)

    stats = {}
    for n, (d, a) in train.items():
        A = torch.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
        S = torch.einsum("nti,ntj->ij", d, d) / (d.shape[0] * d.shape[1])
        stats[n] = (A, S)

    def whitened(n, d, a):
        A, S = stats[n]
        lam_a, lam_s = math.sqrt(0.1) * A.trace() / len(A), math.sqrt(0.1) * S.trace() / len(S)
        return d @ root_inv(S, lam_s), a @ root_inv(A, lam_a)

    def sketch(kind, n, d, a, k, gen, white):
        if white:
            d, a = whitened(n, d, a)
        do, di = d.shape[-1], a.shape[-1]
        if kind == "kron":
            r = int(round(math.sqrt(k)))
            po = randn(do, r, generator=gen, dtype=d.dtype) / math.sqrt(r)
            pi = randn(di, r, generator=gen, dtype=d.dtype) / math.sqrt(r)
            return torch.einsum("ntr,nts->nrs", d @ po, a @ pi).flatten(1)
        if kind.startswith("mix"):  # top eigenvectors of each side's factor exactly + random on the complement
            r = int(round(math.sqrt(k)))
            h = r // int(kind[3:] or 2)
            A, S = stats[n]
            sides = []
            for m, dim in ((S, do), (A, di)):
                u = torch.linalg.eigh(m)[1][:, -h:] if h else m[:, :0]
                rnd = randn(dim, r - h, generator=gen, dtype=d.dtype) / math.sqrt(r - h)
                sides.append(torch.cat([u, rnd - u @ (u.T @ rnd)], 1))
            if white:  # eigenvectors of the whitened factor = those of the factor; rotate into whitened space
                pass
            return torch.einsum("ntr,nts->nrs", d @ sides[0], a @ sides[1]).flatten(1)
        if kind.startswith("block"):  # m blocks of b x b
            b = int(kind[5:])
            m = k // (b * b)
            po = randn(m, do, b, generator=gen, dtype=d.dtype) / math.sqrt(b)
            pi = randn(m, di, b, generator=gen, dtype=d.dtype) / math.sqrt(b)
            return torch.einsum("mntr,mnts->nmrs", torch.einsum("ntd,mdr->mntr", d, po),
                                torch.einsum("ntd,mdr->mntr", a, pi)).flatten(1) / math.sqrt(m)
        if kind == "kr":  # k rank-one sketches u_jᵀ G v_j
            u = randn(do, k, generator=gen, dtype=d.dtype)
            v = randn(di, k, generator=gen, dtype=d.dtype)
            return torch.einsum("ntk,ntk->nk", d @ u, a @ v) / math.sqrt(k)
        if kind == "dense":
            g = torch.einsum("nto,nti->noi", d, a).flatten(1)
            out = []
            for start in range(0, g.shape[1], 8192):
                r = randn(min(8192, g.shape[1] - start), k, generator=gen, dtype=d.dtype)
                out.append(g[:, start:start + r.shape[0]] @ r)
            return sum(out) / math.sqrt(k)
        if kind == "full":
            return torch.einsum("nto,nti->noi", d, a).flatten(1)
        raise ValueError(kind)

    def quantize(x, how):
        """Training sketches as they would be stored: rows (N, k) -> dequantized rows."""
        if how == "fp32":
            return x
        if how == "fp16":
            return x.half().double()
        if how in ("int8", "int4"):
            levels = 127 if how == "int8" else 7
            scale = x.abs().amax(1, keepdim=True).clamp_min(1e-30) / levels
            return torch.round(x / scale).clamp(-levels, levels) * scale
        if how == "sign":  # 1 bit per number + the row's norm: unbiased for Gaussian sketches
            return torch.sign(x) * x.norm(dim=1, keepdim=True) * math.sqrt(math.pi / 2) / math.sqrt(x.shape[1])
        raise ValueError(how)

    def query_sides(n, rows, white, source=None, values=False):
        """Top eigenvectors, per side, of the (whitened) query gradients of ``rows``: M_out = Σ q qᵀ,
        M_in = Σ qᵀ q."""
        dq, aq = (source or query)[n]
        dq, aq = dq[rows], aq[rows]
        if white:
            dq, aq = whitened(n, dq, aq)
        g = torch.einsum("nto,nti->noi", dq, aq)
        if NORMALISE:  # every query the same weight in the Grams
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
        out = (torch.linalg.eigh(torch.einsum("noi,npi->op", g, g)),
               torch.linalg.eigh(torch.einsum("noi,nop->ip", g, g)))
        return out if values else (out[0][1], out[1][1])

    def evaluate_query_aware(k, white, curv, oracle=False, share=1.0, seed=0, other=False, allocated=False,
                             quant="fp32"):
        """P = top eigenvectors of the query gradients of the *other* half of the queries (two folds;
        ``oracle``: of all queries); ``share`` < 1: that share of the rank, the rest random (whitened)."""
        nq = query[next(iter(query))][0].shape[0]
        folds = [np.arange(nq)[0::2], np.arange(nq)[1::2]]
        total = torch.zeros(nq, len(corpus.train_tokens), dtype=torch.float64, device=DEV)
        r = int(round(math.sqrt(k)))
        h = max(1, int(round(r * share)))
        for f, rows in enumerate(folds):
            fit_rows = np.arange(nq) if oracle else folds[1 - f]
            sides_of = {n: (query_sides(n, np.arange(len(calib_pos)), white, calib, values=True) if other
                            else query_sides(n, fit_rows, white, values=True)) for n in train}
            ranks = {n: (r, r) for n in train}
            if allocated:  # one budget Σ r_out r_in over modules, by query energy (analog.compression.allocate)
                from analog.compression.allocate import allocate
                energies = {}
                for n, ((vo, _), (vi, _)) in sides_of.items():
                    scale = vo.clamp_min(0).sum().sqrt().clamp_min(1e-30)
                    energies[n] = tuple(torch.cat([v.new_zeros(1), v.clamp_min(0).flip(0).cumsum(0)]).cpu() / scale
                                        for v in (vo, vi))
                ranks = allocate(energies, {n: 1 for n in train}, r * r * len(train))
            for n in train:
                gen = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(n.encode()) % 997)
                (_, eo), (_, ei) = sides_of[n]
                dt, at = train[n]
                dq, aq = query[n][0][rows], query[n][1][rows]
                if white:
                    dt, at = whitened(n, dt, at)
                    dq, aq = whitened(n, dq, aq)
                sides = []
                for e, dim, rr in ((eo, dt.shape[-1], ranks[n][0]), (ei, at.shape[-1], ranks[n][1])):
                    u = e[:, -min(h if not allocated else rr, dim):]
                    if h < r:
                        rnd = randn(dim, r - h, generator=gen, dtype=dt.dtype) / math.sqrt(r - h)
                        u = torch.cat([u, rnd - u @ (u.T @ rnd)], 1)
                    sides.append(u)
                xt = quantize(torch.einsum("ntr,nts->nrs", dt @ sides[0], at @ sides[1]).flatten(1), quant)
                xq = torch.einsum("ntr,nts->nrs", dq @ sides[0], aq @ sides[1]).flatten(1)
                total[rows] += raw_scores(xq, xt) if curv == "raw" else xq @ xt.T
        return task.evaluate(total.cpu().numpy())

    def evaluate(kind, k, white, seed, curv="raw", quant="fp32"):
        if kind.startswith("query"):  # query, query_oracle, query_half
            return evaluate_query_aware(k, white, curv, oracle=kind == "query_oracle",
                                        share=0.5 if kind.endswith("half") else 1.0, seed=seed,
                                        other=kind.startswith("query_other"), allocated=kind.endswith("alloc"),
                                        quant=quant)
        total = 0
        for n in train:
            gen = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(n.encode()) % 997)
            dq, aq = query[n]
            dt, at = train[n]
            gen_state = gen.get_state()
            xt = sketch(kind, n, dt, at, k, gen, white)
            gen.set_state(gen_state)
            xq = sketch(kind, n, dq, aq, k, gen, white)
            xt = quantize(xt, quant)
            total = total + (raw_scores(xq, xt) if curv == "raw" else xq @ xt.T)
        return task.evaluate(total.cpu().numpy())

    configs = [("full", 0, True, "dot", "fp32"), ("full", 0, False, "dot", "fp32")]
    if args.plan == "structure":
        for k in (256, 1024):
            for kind in ("kron", "kr", "dense", "block4"):
                for white in (False, True):
                    configs.append((kind, k, white, "raw", "fp32"))
    elif args.plan == "mix":
        for k in (256, 1024):
            for kind in ("kron", "mix", "mix4", "mix1"):
                for white in (False, True):
                    configs.append((kind, k, white, "raw", "fp32"))
    elif args.plan == "query":
        for k in (256, 1024):
            configs.append(("kron", k, True, "raw", "fp32"))
            for kind in ("query", "query_oracle", "query_half", "query_other", "query_other_half"):
                for white, curv in ((True, "raw"), (True, "dot"), (False, "raw")):
                    configs.append((kind, k, white, curv, "fp32"))
    elif args.plan == "query_gpu":
        for k in (256, 1024, 4096):
            configs.append(("kron", k, True, "raw", "fp32"))
            for kind in ("query", "query_oracle", "query_half", "query_other", "query_other_half"):
                configs.append((kind, k, True, "raw", "fp32"))
            configs.append(("query", k, True, "dot", "fp32"))
            configs.append(("query", k, False, "raw", "fp32"))
    elif args.plan == "alloc":
        for k in (256, 1024, 4096):
            for kind in ("query", "query_alloc", "query_other", "query_other_alloc"):
                configs.append((kind, k, True, "raw", "fp32"))
        configs += [("query", 2025, True, "raw", "int4"), ("query_alloc", 2025, True, "raw", "int4")]
    elif args.plan == "gpu":  # ranks at float32 and their int8 equivalents, raw where k << N
        for k in (256, 1024, 4096):
            for white in (False, True):
                configs.append(("kron", k, white, "raw", "fp32"))
                if k == 1024:
                    configs.append(("kron", k, white, "raw", "int8"))
            configs.append(("kron", k, True, "dot", "fp32"))
        configs += [("kron", 2025, True, "raw", "int4"), ("kron", 8100, True, "dot", "sign"),
                    ("kron", 529, True, "raw", "fp16")]
    else:  # the same bytes as rank 16 float32 (1 KiB per module), stored in fewer bits
        for k, quant in ((256, "fp32"), (529, "fp16"), (1024, "int8"), (2025, "int4"), (8100, "sign")):
            for white, curv in ((False, "raw"), (True, "raw"), (True, "dot")):
                if k > 1024 and curv == "raw":
                    continue
                configs.append(("kron", k, white, curv, quant))
        configs += [("kron", 1024, True, "dot", "fp32"), ("kron", 2025, True, "dot", "fp32"),
                    ("kron", 8100, True, "dot", "fp32"), ("kron", 256, True, "dot", "fp32")]
    for kind, k, white, curv, quant in configs:
        if args.only and kind not in args.only:
            continue
        t = time.time()
        seeds = 1 if kind in ("full", "query", "query_oracle", "query_alloc") else args.seeds
        res = [evaluate(kind, k, white, s, curv, quant) for s in range(seeds)]
        r2 = np.mean([r["recall@2"] for r in res])
        mrr = np.mean([r["mrr"] for r in res])
        lds = np.mean([r.get("lds", np.nan) for r in res])
        print(f"{kind:7s} k={k:5d} white={white!s:5s} {curv} {quant}: recall@2 {r2:.3f}  mrr {mrr:.3f}  lds {lds:.3f}  "
              f"({time.time() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
