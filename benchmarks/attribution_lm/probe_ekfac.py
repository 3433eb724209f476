"""Offline probe: why K-FAC/EK-FAC on LoGra-compressed logs score below raw on the same logs (CPU preset LM).

In the compressed space (random LoGra, k = r_out r_in) it compares raw (the k x k second moment C of the
compressed gradients) with K-FAC and EK-FAC built on (a) the projected factors the hooks collect
(P_o S P_o^T, P_i A P_i^T, as analog does) and (b) the nearest Kronecker product of C itself (Van Loan-
Pitsianis: the best any Kronecker structure can do), and prints how far each approximation is from C.
Results: sketch_probe.md section 7.

    python -m benchmarks.attribution_lm.probe_ekfac [cache dir]
"""

import math
import sys
import zlib

import numpy as np
import torch

from benchmarks.attribution_lm.probe import captured_cpu_lm, raw_scores

torch.set_num_threads(2)
task, train, query = captured_cpu_lm(sys.argv[1] if len(sys.argv) > 1 else "outputs/attribution_lm")


def ekfac_scores(xq, xt, qs, qa, ro, ri):
    """EK-FAC in the (r_out, r_in) space with eigenbases qs (ro×ro), qa (ri×ri): corrected eigenvalues from xt."""
    gt = qs.T @ xt.reshape(-1, ro, ri) @ qa
    gq = qs.T @ xq.reshape(-1, ro, ri) @ qa
    lam_e = (gt**2).mean(0)
    lam = 0.1 * lam_e.mean()
    return gq.flatten(1) @ (gt / (lam_e + lam)).flatten(1).T


def kfac_scores(xq, xt, S, A, ro, ri):
    es, qs = torch.linalg.eigh(S)
    ea, qa = torch.linalg.eigh(A)
    ev = es.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :]
    lam = 0.1 * ev.mean()
    gt = qs.T @ xt.reshape(-1, ro, ri) @ qa
    gq = qs.T @ xq.reshape(-1, ro, ri) @ qa
    return gq.flatten(1) @ (gt / (ev + lam)).flatten(1).T


def nearest_kron(C, ro, ri):
    R = C.reshape(ro, ri, ro, ri).permute(0, 2, 1, 3).reshape(ro * ro, ri * ri)
    U, s, Vh = torch.linalg.svd(R, full_matrices=False)
    S = (U[:, 0] * s[0].sqrt()).reshape(ro, ro)
    A = (Vh[0] * s[0].sqrt()).reshape(ri, ri)
    if S.trace() < 0:
        S, A = -S, -A
    return (S + S.T) / 2, (A + A.T) / 2


def rel_err(C, M):
    return float((C - M).norm() / C.norm())


for k in (64, 256):
    r = int(round(math.sqrt(k)))
    totals = {m: 0 for m in ("raw", "ekfac-hooks", "ekfac-nkp", "kfac-hooks", "kfac-nkp", "ekfac-eig-raw-blocks")}
    errs = {"kfac-hooks": [], "kfac-nkp": [], "ekfac-hooks": [], "ekfac-nkp": []}
    for n in train:
        gen = torch.Generator().manual_seed(zlib.crc32(n.encode()) % 997)
        (d, a), (dq, aq) = train[n], query[n]
        po = torch.randn(d.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
        pi = torch.randn(a.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
        dt_, at_ = d @ po, a @ pi
        xt = torch.einsum("ntr,nts->nrs", dt_, at_).flatten(1)
        xq = torch.einsum("ntr,nts->nrs", dq @ po, aq @ pi).flatten(1)
        N, T = d.shape[0], d.shape[1]
        A = torch.einsum("nti,ntj->ij", at_, at_) / (N * T)
        S = torch.einsum("nto,ntp->op", dt_, dt_) / N
        C = xt.T @ xt / N
        Sn, An = nearest_kron(C, r, r)
        totals["raw"] += raw_scores(xq, xt)
        totals["kfac-hooks"] += kfac_scores(xq, xt, S, A, r, r)
        totals["kfac-nkp"] += kfac_scores(xq, xt, Sn, An, r, r)
        qs, qa = torch.linalg.eigh(S)[1], torch.linalg.eigh(A)[1]
        totals["ekfac-hooks"] += ekfac_scores(xq, xt, qs, qa, r, r)
        qsn, qan = torch.linalg.eigh(Sn)[1], torch.linalg.eigh(An)[1]
        totals["ekfac-nkp"] += ekfac_scores(xq, xt, qsn, qan, r, r)
        errs["kfac-hooks"].append(rel_err(C, torch.kron(S, A)))
        errs["kfac-nkp"].append(rel_err(C, torch.kron(Sn, An)))
        for name, (q1, q2) in (("ekfac-hooks", (qs, qa)), ("ekfac-nkp", (qsn, qan))):
            Q = torch.kron(q1, q2)
            lam_e = ((q1.T @ xt.reshape(-1, r, r) @ q2) ** 2).mean(0).flatten()
            errs[name].append(rel_err(C, Q @ torch.diag(lam_e) @ Q.T))
    for m, t in totals.items():
        if isinstance(t, int):
            continue
        res = task.evaluate(t.numpy())
        e = np.mean(errs[m]) if m in errs else 0.0
        print(
            f"k={k} {m:14s} recall@2 {res['recall@2']:.3f} lds {res['lds']:.3f}  ‖C − approx‖/‖C‖ {e:.3f}", flush=True
        )
