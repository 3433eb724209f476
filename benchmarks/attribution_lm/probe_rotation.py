"""Offline probe: what int2's rotation (analog.storage.rotation) does to the 2-bit code on a language model's
sketches, without analog's logging path. Exact per-token gradients of the ``cpu4k`` LM (probe.py's capture),
a Kronecker random sketch of k values per module (unwhitened, as LoGra ``init: random``, or K-FAC whitened
with ``--whiten``), training rows coded by the 2-bit Lloyd–Max code plain, rotated by analog's R, or rotated
by R with other sign seeds; queries stay float; scores are ``raw`` (probe.raw_scores). Prints recall@2 / LDS
per codec, and with ``--mse`` the code's relative squared error and the rows' kurtosis per module; with
``--metric``, per module and codec, the error in the metric the scores use: with F̂ = xᵀx / N of the float
sketches, λ = 0.1 tr(F̂) / k, M = (F̂ + λI)⁻¹ and e_n = x̂_n − β_n x_n (β_n the row's least-squares rescaling,
which no ranking sees), the ratios Σ‖e‖² / Σ‖x‖², Σ eᵀMe / Σ xᵀMx and Σ (q̃ᵀe)² / Σ (q̃ᵀx)² over queries q
(q̃ = M q). Results: attribution_lm_summary.md runs 16–17.

    python -m benchmarks.attribution_lm.probe_rotation CACHE [--whiten] [--ks 4096 1024] [--mse | --metric]
"""

import argparse
import math
import time
import zlib

import torch

from analog.storage.rotation import Rotation, _hadamard_block
from benchmarks.attribution_lm.probe import captured_cpu_lm, kfac_whitener, raw_scores

parser = argparse.ArgumentParser()
parser.add_argument("cache")
parser.add_argument("--whiten", action="store_true")
parser.add_argument("--ks", type=int, nargs="*", default=[4096, 1024])
parser.add_argument("--mse", action="store_true", help="print the code's error and the rows' kurtosis instead")
parser.add_argument("--metric", action="store_true", help="print the code's error in the scores' metric instead")
args = parser.parse_args()
torch.set_num_threads(2)
task, train, query = captured_cpu_lm(args.cache, "cpu4k")


def lloyd2(x):  # 4 levels, Gaussian Lloyd–Max by the row's RMS: ±0.4528σ, ±1.5104σ, thresholds 0, ±0.9816σ
    s = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    z = x / s
    return torch.sign(z) * torch.where(z.abs() > 0.9816, 1.5104, 0.4528) * s


def analog_rotated(x):
    r = Rotation(x.shape[1])
    return r.inverse(lloyd2(r.forward(x)))


def sign_seed(seed):  # H · D with other random signs (k a power of two)
    def code(x):
        m = x.shape[1].bit_length() - 1
        d = (torch.randint(0, 2, (x.shape[1],), generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(x.dtype)
        return _hadamard_block(lloyd2(_hadamard_block(x * d, m)), m) * d
    return code


def sketches(name, k):
    d, a = train[name]
    dq, aq = query[name]
    if args.whiten:
        w = kfac_whitener(d, a)
        (d, a), (dq, aq) = w(d, a), w(dq, aq)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 997)
    r = int(round(math.sqrt(k)))
    po = torch.randn(d.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
    pi = torch.randn(a.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
    return (torch.einsum("ntr,nts->nrs", d @ po, a @ pi).flatten(1),
            torch.einsum("ntr,nts->nrs", dq @ po, aq @ pi).flatten(1))


codecs = {"float": lambda x: x, "plain": lloyd2, "rotated": analog_rotated, "signs-1": sign_seed(1),
          "signs-2": sign_seed(2)}
for k in args.ks:
    if args.mse:
        for name in train:
            x = sketches(name, k)[0].float()
            z = x / x.pow(2).mean(1, keepdim=True).sqrt()
            rel = {c: ((codecs[c](x) - x).pow(2).sum(1) / x.pow(2).sum(1)).mean().item() for c in ("plain", "rotated")}
            print(f"k={k} {name:24s} kurtosis (median row) {z.pow(4).mean(1).median().item():5.2f}  relative MSE "
                  f"plain {rel['plain']:.4f} rotated {rel['rotated']:.4f}", flush=True)
        continue
    if args.metric:
        for name in train:
            xt, xq = (x.double() for x in sketches(name, k))
            f = xt.T @ xt / len(xt)
            m = torch.linalg.inv(f + 0.1 * torch.trace(f) / k * torch.eye(k, dtype=f.dtype))
            qt = xq @ m
            signal = (xt.pow(2).sum().item(), (xt @ m * xt).sum().item(), (qt @ xt.T).pow(2).sum().item())
            cells = []
            for c in ("plain", "rotated", "signs-1", "signs-2"):
                xh = codecs[c](xt.float()).double()
                e = xh - (xh * xt).sum(1, keepdim=True) / xt.pow(2).sum(1, keepdim=True) * xt
                err = (e.pow(2).sum().item(), (e @ m * e).sum().item(), (qt @ e.T).pow(2).sum().item())
                cells.append(f"{c} " + " ".join(f"{a / b:.3f}" for a, b in zip(err, signal)))
            print(f"k={k} {name:16s} ‖e‖² eᵀMe (q̃ᵀe)², relative: " + " | ".join(cells), flush=True)
        continue
    for label, code in codecs.items():
        t, total = time.time(), 0
        for name in train:
            xt, xq = sketches(name, k)
            total = total + raw_scores(xq, code(xt))
        res = task.evaluate(total.numpy())
        print(f"k={k} {'whitened' if args.whiten else 'random'} {label:8s} recall@2 {res['recall@2']:.3f} "
              f"lds {res['lds']:.3f} ({time.time() - t:.0f}s)", flush=True)
