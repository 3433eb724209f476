"""Offline probe: how many bits a stored sketch value needs. Kronecker random whitened sketch + raw on the CPU preset LM
(50 retrained halves), training rows quantised per row: absmax int8 / int4 / int2, 2-bit Lloyd-Max by the row RMS,
ternary, sign. Query rows stay float. Results: sketch_probe.md section 6.

    python -m benchmarks.attribution_lm.probe_bits [cache dir]
    python -m benchmarks.attribution_lm.probe_bits CACHE --preset cpu4k --ks 256:int8 529:int4 1024:2bit-lloyd

The second form compares chosen (k, codec) pairs, e.g. equal bytes a module, on the 4,096-sequence LM.
"""

import argparse
import math
import time
import zlib

import torch

from benchmarks.attribution_lm.probe import captured_cpu_lm, kfac_whitener, raw_scores

torch.set_num_threads(2)
parser = argparse.ArgumentParser()
parser.add_argument("cache", nargs="?", default="outputs/attribution_lm")
parser.add_argument("--preset", default="cpu")
parser.add_argument("--ks", nargs="*", help="k:codec pairs (default: k 256 and 1,024, every codec)")
args = parser.parse_args()
task, train, query = captured_cpu_lm(args.cache, args.preset)


def whiten_fn(n):
    return kfac_whitener(*train[n])


def q_absmax(x, L):
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / L
    return torch.round(x / s).clamp(-L, L) * s


def q_lloyd2(x):  # 4 levels, Gaussian Lloyd-Max by the row's RMS: ±0.4528σ, ±1.510σ, thresholds 0, ±0.9816σ
    s = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    z = x / s
    mag = torch.where(z.abs() > 0.9816, 1.510, 0.4528)
    return torch.sign(z) * mag * s


def q_ternary(x):  # {-1,0,1}·c, threshold 0.6σ; c = mean |x| over kept
    s = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
    keep = x.abs() > 0.6 * s
    c = (x.abs() * keep).sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
    return torch.sign(x) * keep * c


def q_sign(x):
    return torch.sign(x) * x.abs().mean(-1, keepdim=True)


Q = {
    "fp32": lambda x: x,
    "int8": lambda x: q_absmax(x, 127),
    "int4": lambda x: q_absmax(x, 7),
    "int2-absmax": lambda x: q_absmax(x, 1),
    "2bit-lloyd": q_lloyd2,
    "ternary": q_ternary,
    "1bit-sign": q_sign,
}
pairs = [(int(p.split(":")[0]), p.split(":")[1]) for p in args.ks] if args.ks else \
    [(k, qn) for k in (256, 1024) for qn in Q]
for k, qn in pairs:
    t = time.time()
    total = 0
    for n in train:  # the Kronecker random sketch of the K-FAC-whitened gradient ("random-white")
        w = whiten_fn(n)
        gen = torch.Generator().manual_seed(zlib.crc32(n.encode()) % 997)
        (d, a), (dq, aq) = w(*train[n]), w(*query[n])
        r = int(round(math.sqrt(k)))
        po = torch.randn(d.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
        pi = torch.randn(a.shape[-1], r, generator=gen, dtype=d.dtype) / math.sqrt(r)
        xt = Q[qn](torch.einsum("ntr,nts->nrs", d @ po, a @ pi).flatten(1))
        xq = torch.einsum("ntr,nts->nrs", dq @ po, aq @ pi).flatten(1)
        total = total + raw_scores(xq, xt)
    res = task.evaluate(total.numpy())
    print(f"k={k:5d} random-white {qn:12s} recall@2 {res['recall@2']:.3f} lds {res['lds']:.3f} "
          f"({time.time() - t:.1f}s)", flush=True)
