"""Raw curvature fit: peak memory and time on a synthetic store, per ``fit_bytes`` budget.

A store of ``--modules`` modules, each logging a (64, 64) LoGra gradient (k = 4096), ``--rows``
rows of int8 (low-rank signal plus noise, so the covariances are not white), is written once; then
each budget fits ``hessian: raw`` from it in its own subprocess, which reports the fit's wall and
CPU time (the latter less moved by other processes on a shared machine), its number of reads of the
store, the process's peak RSS (``ru_maxrss``) minus its RSS just before the fit (imports, open
store), and the bytes of the fitted state. ``--fit-bytes 0`` calls ``finalize`` without the option (a
checkout that has no budget).

    python -m benchmarks.bench_raw_fit --fit-bytes 0 1073741824 268435456
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIDE = 64  # (64, 64) per module: k = 4096, LoGra rank 64


def write_store(path: Path, modules: int, rows: int, batch: int = 256) -> None:
    from analog.storage import LogWriter

    fields = [{"module": f"m{i}", "kind": "grad", "shape": [SIDE, SIDE]} for i in range(modules)]
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(modules, 256, SIDE * SIDE, generator=gen)
    writer = LogWriter(path, fields, "int8")
    for start in range(0, rows, batch):
        b = min(batch, rows - start)
        coef = torch.randn(modules, b, 256, generator=gen) * torch.logspace(0, -2, 256)
        x = (coef @ basis + 0.05 * torch.randn(modules, b, SIDE * SIDE, generator=gen)).transpose(0, 1)
        writer.write([start + i for i in range(b)], x.reshape(b, -1).contiguous())
    writer.close()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def fit(path: str, fit_bytes: int) -> dict:
    import analog.hessian.base as base
    import analog.hessian.simple as simple
    from analog.hessian import build_curvature
    from analog.storage import LogStore

    passes = []
    inner = base.store_batches

    def counted(*args, **kwargs):
        passes.append(1)
        return inner(*args, **kwargs)

    for module in (base, simple):  # older checkouts import store_batches into simple
        if hasattr(module, "store_batches"):
            module.store_batches = counted
    store = LogStore(path)
    curvature = build_curvature("raw")
    before = rss_mib()
    t, cpu = time.perf_counter(), time.process_time()
    curvature.finalize(store, **({"fit_bytes": fit_bytes} if fit_bytes else {}))
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = sum(v.numel() * v.element_size() for v in curvature.state.values()) / 2**20
    return {"fit_bytes": fit_bytes, "passes": len(passes), "fit_s": round(seconds, 1),
            "fit_cpu_s": round(cpu_seconds, 1), "peak_rss_mib": round(peak), "rss_before_mib": round(before),
            "peak_minus_before_mib": round(peak - before), "state_mib": round(state),
            "evecs_dtype": str(curvature.state["m0/evecs"].dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--fit-bytes", type=int, nargs="+", default=[0, 2**30, 2**28])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        print(json.dumps(fit(args.child, args.fit_bytes[0])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        write_store(path, args.modules, args.rows)
        for budget in args.fit_bytes:
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_raw_fit", "--child", str(path),
                                  "--fit-bytes", str(budget)], capture_output=True, text=True, check=True)
            print(json.dumps({"modules": args.modules, "k": SIDE * SIDE, "rows": args.rows,
                              **json.loads(out.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
