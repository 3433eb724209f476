"""Logging-step cost of the fitted LoGra inits against today's random LoGra (issue 9).

Whitening folds into P_in and P_out, so a ``whiten`` logging step does the same matrix products as a
``random`` one; ``allocate: spectrum`` keeps the stored numbers but may move rank to the wider side,
which changes the projection cost. For each config the statistics pass (if any) runs once over the
batches, then plain steps and logging steps (save=True, hessian kfac) are interleaved and timed; the
table gives the medians, the step relative to a random-LoGra step, and the statistics pass time.

    python -m benchmarks.bench_whiten_step [--model mlp|gpt2] [--batch 8] [--batches 8] [--rank 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from analog import AnaLog
from benchmarks.bench_logging import build

CONFIGS = [("random", {}), ("whiten", {"init": "whiten"}), ("whiten_pca", {"init": "whiten_pca"}),
           ("pca + spectrum", {"init": "pca", "allocate": "spectrum"}),
           ("whiten + spectrum", {"init": "whiten", "allocate": "spectrum"})]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, extra: dict, batch: int, batches: int, rank: int, model_name: str) -> dict:
    model, step, watch, desc = build(model_name, batch)
    with tempfile.TemporaryDirectory() as root:
        run = AnaLog("w", {"root_dir": root, "hessian": "kfac", "progress": False,  # float32, as recorded
                           "compression": {"type": "logra", "rank": rank, **extra}, "storage": {"dtype": "float32"}})
        run.watch(model, **watch)
        ids = iter(range(10**9))

        def logging():
            with run(data_id=[next(ids) for _ in range(batch)]):
                step().backward()
            model.zero_grad(set_to_none=True)

        def plain():
            step().backward()
            model.zero_grad(set_to_none=True)

        stats = 0.0
        if run.phase != "log":  # the statistics pass: uncompressed K-FAC factors, nothing stored
            stats = sum(timed(logging) for _ in range(batches))
            run.next_pass()
        for _ in range(2):
            plain(), logging()
        t_plain, t_log = [], []
        for _ in range(batches):
            t_plain.append(timed(plain))
            t_log.append(timed(logging))
        run.finalize()
    return {"name": name, "model": desc, "plain": statistics.median(t_plain), "log": statistics.median(t_log),
            "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", choices=["mlp", "gpt2"], default="gpt2")
    args = parser.parse_args()
    rows = [measure(name, extra, args.batch, args.batches, args.rank, args.model) for name, extra in CONFIGS]
    base = rows[0]["log"] / rows[0]["plain"]
    print(f"{rows[0]['model']}, batch {args.batch}, LoGra rank {args.rank}; {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("| init | plain step (s) | logging step (s) | step / plain | vs random | statistics pass (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["log"] / r["plain"]
        print(f"| {r['name']} | {r['plain']:.4f} | {r['log']:.4f} | {ratio:.2f} | {ratio / base:.2f} | "
              f"{r['stats']:.2f} |")


if __name__ == "__main__":
    main()
