"""Compressed against uncompressed attribution on the digits LDS task (issue 9): one row per config.

Every row logs the 1,000 training digits through ``AnaLogScheduler`` (so configs with a statistics
pass get it), fits its curvature, scores the 600 test digits and reports the LDS against the cached
retraining ground truth of ``benchmarks.influence`` (100 subsets × 3 seeds), the numbers stored per
example and the time of the whole fit + score. Damping is analog's default (0.1 × mean eigenvalue per
module) unless a row says ``λ=1e-3`` (the task's absolute damping).

    python -m benchmarks.influence.compression_sweep [--out benchmarks/results/compression_digits.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.influence import analog_methods as am
from benchmarks.influence.ground_truth import load_or_compute
from benchmarks.influence.lds import lds
from benchmarks.influence.task import build_task


def logra(rank, init="random", **extra):
    return {"type": "logra", "rank": rank, "init": init, "seed": 0, **extra}


NONE = {"type": "none"}
#: (name, hessian, compression, damping, influence mode)
ROWS = [("uncompressed ekfac", "ekfac", NONE, None, "dot"),
        ("uncompressed kfac", "kfac", NONE, None, "dot"),
        ("uncompressed ekfac λ=1e-3", "ekfac", NONE, 1e-3, "dot"),
        ("uncompressed identity", "none", NONE, None, "dot")]
for _hessian in ("kfac", "ekfac", "raw"):
    ROWS += [(f"r16 random {_hessian}", _hessian, logra(16), None, "dot"),
             (f"r16 pca {_hessian}", _hessian, logra(16, "pca"), None, "dot"),
             (f"r16 whiten {_hessian}", _hessian, logra(16, "whiten"), None, "dot"),
             (f"r16 whiten_pca {_hessian}", _hessian, logra(16, "whiten_pca"), None, "dot"),
             (f"r16 whiten_pca spectrum {_hessian}", _hessian, logra(16, "whiten_pca", allocate="spectrum"), None,
              "dot"),
             (f"r16 pca spectrum {_hessian}", _hessian, logra(16, "pca", allocate="spectrum"), None, "dot"),
             (f"r16 whiten spectrum {_hessian}", _hessian, logra(16, "whiten", allocate="spectrum"), None, "dot")]
ROWS += [("r16 whiten none", "none", logra(16, "whiten"), None, "dot"),
         ("r16 random raw λ=1e-3", "raw", logra(16), 1e-3, "dot"),
         ("r16 random raw cosine", "raw", logra(16), None, "cosine"),
         ("r16 whiten kfac cosine", "kfac", logra(16, "whiten"), None, "cosine"),
         ("uncompressed ekfac cosine", "ekfac", NONE, None, "cosine"),
         ("full-rank whiten none (= K-FAC, split damping)", "none", logra(10_000, "whiten"), None, "dot")]
for _rank in (8, 32):
    ROWS += [(f"r{_rank} random raw", "raw", logra(_rank), None, "dot"),
             (f"r{_rank} whiten kfac", "kfac", logra(_rank, "whiten"), None, "dot"),
             (f"r{_rank} pca spectrum raw", "raw", logra(_rank, "pca", allocate="spectrum"), None, "dot")]


def score(task, hessian, compression, damping, mode):
    """(scores n_test × n_train, numbers stored per example, seconds)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        run, model = am._fit(task, root, hessian, compression, damping)
        idx = torch.arange(task.n_test)
        with run():
            F.cross_entropy(model(task.x_test[idx]), task.y_test[idx], reduction="sum").backward()
        model.zero_grad(set_to_none=True)
        scores = run.influence.compute_influence_all(run.get_log(), run.build_log_dataloader(1000), mode=mode)
        numbers = sum(int(np.prod(f["shape"])) for f in run.open_store().fields)
    return scores.scores.numpy(), numbers, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/compression_digits.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = build_task("small")
    truth = load_or_compute(task)
    lines = ["| config | hessian | numbers / example | LDS | × uncompressed EK-FAC | fit + score (s) |",
             "|---|---|---:|---:|---:|---:|"]
    reference = None
    for name, hessian, compression, damping, mode in ROWS:
        scores, numbers, seconds = score(task, hessian, compression, damping, mode)
        value = lds(scores, truth["masks"], truth["outputs"])
        reference = value if reference is None else reference
        lines.append(f"| {name} | {hessian} | {numbers} | {value:.3f} | {value / reference:.2f} | {seconds:.2f} |")
        print(lines[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write("# Compression on the digits LDS task (issue 9)\n\n"
                 f"Command: `python -m benchmarks.influence.compression_sweep`. Machine: {machine}, no GPU.\n\n"
                 + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
