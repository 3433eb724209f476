"""Benchmark: time and peak memory of ``analog metrics`` over 50 checkpoints of a ~10M-parameter model.

    python benchmarks/bench_checkpoint_metrics.py [--checkpoints 50] [--keep DIR]

Writes ``benchmarks/results/checkpoint_metrics.md``. Checkpoints are float32 ``.safetensors`` of a
12-block transformer-shaped state dict (d_model 256, MLP 1024, vocab 1000) generated into a
temporary directory. The analysis runs in a child process so its peak RSS (``ru_maxrss`` of the
children) is measured apart from this script; a second child that only imports analog and torch
gives the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

METRICS = "frobenius,spectral,per,effective_rank,stable_rank,condition,gini,entropy,kurtosis,alpha"
D, FF, LAYERS, VOCAB = 256, 1024, 12, 1000


def make_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    state = {"model.embed_tokens.weight": torch.randn(VOCAB, D, generator=g) * 0.02}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"attn.{name}.weight"] = torch.randn(D, D, generator=g) * (0.05 + step * 1e-4)
        state[p + "mlp.up_proj.weight"] = torch.randn(FF, D, generator=g) * 0.03
        state[p + "mlp.down_proj.weight"] = torch.randn(D, FF, generator=g) * 0.03
        state[p + "input_norm.weight"] = torch.ones(D)
    return state


def child_peak_rss_mb(cmd, threads: int) -> tuple:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(peak, before) / 1024  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the analysis process")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_metrics.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Path(tmp) / "ckpts"
        ckpts.mkdir()
        start = time.perf_counter()
        for k in range(args.checkpoints):
            save_file(make_state(k), str(ckpts / f"step_{k * 100}.safetensors"))
        gen_s = time.perf_counter() - start
        size_mb = (ckpts / "step_0.safetensors").stat().st_size / 2**20
        n_params = sum(t.numel() for t in make_state(0).values())
        base_s, base_mb = child_peak_rss_mb([sys.executable, "-c", "import torch, analog.metrics"], args.threads)
        cmd = [
            sys.executable,
            "-m",
            "analog",
            "metrics",
            "--dir",
            str(ckpts),
            "--metrics",
            METRICS,
            "--output-dir",
            str(Path(tmp) / "out"),
            "--quiet",
        ]
        run_s, peak_mb = child_peak_rss_mb(cmd, args.threads)
        n_rows = sum(1 for _ in open(Path(tmp) / "out" / "checkpoint_metrics" / "metrics.csv")) - 1
    table = [
        ("checkpoints", f"{args.checkpoints} × {n_params / 1e6:.2f}M params (float32 safetensors)"),
        ("one checkpoint on disk", f"{size_mb:.1f} MiB"),
        ("metrics", f"10 ({METRICS}); {n_rows} values"),
        ("wall time, analysis", f"{run_s:.1f} s ({run_s / args.checkpoints:.2f} s per checkpoint)"),
        ("peak RSS, analysis process", f"{peak_mb:.0f} MiB"),
        ("peak RSS, import torch + analog only", f"{base_mb:.0f} MiB"),
        ("peak RSS above baseline", f"{peak_mb - base_mb:.0f} MiB = {(peak_mb - base_mb) / size_mb:.1f} × checkpoint"),
        ("generating checkpoints (not timed above)", f"{gen_s:.1f} s"),
    ]
    width = max(len(k) for k, _ in table)
    text = "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in table)
    print(text)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    machine += f", torch {torch.__version__}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        "# Checkpoint metrics benchmark\n\n"
        f"Command: `python benchmarks/bench_checkpoint_metrics.py --checkpoints {args.checkpoints} "
        f"--threads {args.threads}`\n\n"
        f"Machine: {machine} ({platform.platform()}); OMP/MKL threads: {args.threads}; "
        f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the machine is shared with other jobs).\n\n"
        f"Analysis command: `analog metrics --dir DIR --metrics {METRICS} --quiet`\n\n"
        "| quantity | value |\n|---|---|\n" + text + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
