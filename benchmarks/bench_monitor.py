"""Overhead of one training-monitor measurement on a ~100M-parameter GPT-2-style model (CPU).

    python benchmarks/bench_monitor.py [--layers 12] [--dim 768] [--vocab 16384] [--seq 128] [--out PATH]

Times (median of ``--repeats``): snapshot capture, Δ, ParameterChangeMetrics (global, and with
per-layer and per-component groups) and SparseQualityMetrics (3 thresholds, with and without the
random baseline), plus one plain forward for scale. Memory: snapshot bytes / model bytes, and the
resident-set peak (VmHWM, Linux) above the baseline during a full manager measurement.
Writes a Markdown note to ``benchmarks/results/monitor.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from analog.monitor import (
    AnalysisContext,
    ModelAnalysisManager,
    MonitorConfig,
    ParameterChangeMetrics,
    ParameterDelta,
    ParameterSnapshot,
    SparseQualityMetrics,
)


def rss_gib(field: str = "VmRSS") -> float:
    """Resident memory of this process from /proc/self/status, in GiB (NaN off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn, repeats: int, label: str = ""):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    if label:
        print(f"{label}: {', '.join(f'{t:.3f}' for t in times)} s", file=sys.stderr, flush=True)
    return statistics.median(times), result


def build_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.dim,
        n_head=args.dim // 64,
        vocab_size=args.vocab,
        n_positions=args.seq,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def fake_update(model, scale=1e-5, keep=0.7):
    """An optimizer-step-sized change on ~``keep`` of the entries (vectorised per tensor)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale * (torch.rand_like(param) < keep))


def run(args):
    model = build_model(args)
    numel = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    inputs = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq))}
    with torch.no_grad():
        model(**inputs)  # warm-up
    memory = measure_manager_memory(model, inputs)  # first, before other allocations are cached
    with torch.no_grad():
        forward_s, _ = timed(lambda: model(**inputs), args.repeats, "forward")
    snap_s, old = timed(lambda: ParameterSnapshot.capture(model), args.repeats, "snapshot")
    rows = [("one forward pass (for scale)", forward_s), ("ParameterSnapshot.capture (float32, CPU)", snap_s)]
    fake_update(model)
    new = ParameterSnapshot.capture(model)
    rows += time_computers(model, inputs, old, new, args.repeats, args.sparse_repeats)
    return {"numel": numel, "model_bytes": model_bytes, "snapshot_bytes": old.nbytes, "rows": rows, **memory}


def time_computers(model, inputs, old, new, repeats, sparse_repeats):
    """Median seconds of Δ and of each computer on (old, new)."""
    rows = []
    delta_s, delta = timed(lambda: ParameterDelta.between(old, new), repeats, "delta")
    rows.append(("ParameterDelta.between", delta_s))
    thresholds = [1e-8, 1e-6, 1e-4]
    change_computers = (
        ("ParameterChangeMetrics (global, 3 thresholds)", ParameterChangeMetrics(thresholds)),
        ("ParameterChangeMetrics (+ per-layer + components)", ParameterChangeMetrics(thresholds, True, True)),
    )
    for label, computer in change_computers:
        # a fresh delta each time: its global statistics are cached after the first use
        seconds, metrics = timed(partial(_change_metrics, computer, old, new), repeats, label)
        rows.append((label + f", {len(metrics)} keys (incl. Δ)", seconds))
    context = AnalysisContext(model=model, inputs=inputs)
    for label, include_random in (("SparseQualityMetrics (3 thresholds)", False), ("  + random baseline", True)):
        computer = SparseQualityMetrics(thresholds, include_random=include_random)
        seconds, metrics = timed(
            partial(computer.compute, delta=delta, snapshot=old, context=context), sparse_repeats, label
        )
        rows.append((label + f", {len(metrics)} keys", seconds))
    return rows


def _change_metrics(computer, old, new):
    return computer.compute(delta=ParameterDelta.between(old, new))


def measure_manager_memory(model, inputs):
    """Resident memory above the baseline: with one snapshot held, and at the peak of a measurement."""
    # the measured set of the recorded results: parameter change and sparse quality (no gradients here)
    manager = ModelAnalysisManager.create(
        MonitorConfig.comprehensive(interval=1, gradient_enabled=False, momentum_enabled=False)
    )
    base = rss_gib()
    manager.start(model)
    held = rss_gib() - base
    fake_update(model)
    reset_peak()
    start = time.perf_counter()
    metrics = manager.on_optimizer_step(model, inputs=inputs)
    seconds = time.perf_counter() - start
    peak = rss_gib("VmHWM") - base
    assert metrics and not manager.last_errors, manager.last_errors
    return {"held_gib": held, "peak_gib": peak, "manager_s": seconds, "manager_keys": len(metrics)}


def write_note(result, args, path: Path, command: str) -> str:
    gib = 2**30
    lines = [
        "# Training monitor overhead",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
        f"{args.machine_memory}; torch {torch.__version__}, Python {platform.python_version()}. "
        f"Load average at the end {os.getloadavg()[0]:.1f} (shared machine: other jobs ran alongside).",
        f"Model: GPT-2 style, {args.layers} layers, width {args.dim}, vocabulary {args.vocab}: "
        f"{result['numel'] / 1e6:.1f}M parameters, {result['model_bytes'] / gib:.3f} GiB in float32; "
        f"inputs {args.batch} x {args.seq} tokens. Median of {args.repeats} runs "
        f"({args.sparse_repeats} for SparseQualityMetrics and the manager).",
        "",
        "| operation | seconds |",
        "| --- | ---: |",
        *[f"| {label} | {seconds:.3f} |" for label, seconds in result["rows"]],
        f"| full manager measurement, comprehensive preset ({result['manager_keys']} keys) | "
        f"{result['manager_s']:.3f} |",
        "",
        "| memory | GiB | x model size |",
        "| --- | ---: | ---: |",
        f"| snapshot (float32) | {result['snapshot_bytes'] / gib:.3f} | "
        f"{result['snapshot_bytes'] / result['model_bytes']:.2f} |",
        f"| resident, one snapshot held between measurements | {result['held_gib']:.3f} | "
        f"{result['held_gib'] * gib / result['model_bytes']:.2f} |",
        f"| resident peak during a measurement (above baseline) | {result['peak_gib']:.3f} | "
        f"{result['peak_gib'] * gib / result['model_bytes']:.2f} |",
        "",
        "The peak holds the previous and the new snapshot, Δ, one threshold's masks and the sparsified copy "
        "of the weights swapped into the model for its forward passes.",
    ]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparse-repeats", type=int, default=1, help="runs of the forward-bound sparse metrics")
    parser.add_argument("--machine-memory", default="24 GiB memory")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor.md"))
    args = parser.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])
    print(write_note(run(args), args, Path(args.out), command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
