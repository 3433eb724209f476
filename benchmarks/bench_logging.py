"""Logging benchmark: throughput, overhead vs a plain training step, memory, bytes per example.

For each model, plain steps (forward + backward) and LoGra logging steps (rank 64, save=True to a
temporary store, hessian "kfac") are interleaved and timed; the overhead ratio is
median(logging step) / median(plain step). Memory: peak RSS of the process, and the current RSS
after N and after 4N logged batches (it must not grow with the number of examples logged: the store
streams to disk, bounded by ``flush_bytes``). Each model runs in its own subprocess so RSS is its own.

    python benchmarks/bench_logging.py                     # both models, writes benchmarks/results/logging.md
    python benchmarks/bench_logging.py --model gpt2 --batches 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "logging.md"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(name: str, batch: int):
    """(model, make_batch(step) -> (inputs, loss_fn), watch kwargs, description)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))

        def step():
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

        return model, step, {}, "MLP 784-512-512-10"
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=128)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 1024, (batch, 128))

    def step():
        logits = model(input_ids=ids).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, 1024), ids[:, 1:].reshape(-1), reduction="sum")

    # wpe is shared by the batch (position_ids (1, T)) and cannot be logged per sample
    watch = {"name_filter": ["transformer.h.*", "transformer.wte", "lm_head"]}
    return model, step, watch, "GPT-2 4 layers, width 256, seq 128, vocab 1024"


def run_one(name: str, batch: int, batches: int, rank: int) -> dict:
    from analog import AnaLog

    torch.manual_seed(0)
    model, step, watch, desc = build(name, batch)
    root = tempfile.mkdtemp(prefix="analog-bench-")
    analog = AnaLog(project=name, config={"root_dir": root, "compression": {"type": "logra", "rank": rank},
                                          # float32 rows, as results/logging.md was measured
                                          "storage": {"dtype": "float32", "flush_bytes": 16 * 2**20}})
    analog.update({"log": ["grad"], "save": True, "hessian": "kfac"})
    analog.watch(model, **watch)

    def plain():
        step().backward()
        model.zero_grad(set_to_none=True)

    next_id = [0]

    def logging():
        ids = list(range(next_id[0], next_id[0] + batch))
        next_id[0] += batch
        with analog(data_id=ids):
            step().backward()
        model.zero_grad(set_to_none=True)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up (allocator, first store chunk, kernels)
        plain()
        logging()
    t_plain, t_log, rss = [], [], {}
    for i in range(4 * batches):  # interleaved, so machine noise hits both alike
        t_plain.append(timed(plain))
        t_log.append(timed(logging))
        if i + 1 in (batches, 4 * batches):
            rss[i + 1] = rss_mib()
    t = time.perf_counter()
    analog.finalize()
    t_finalize = time.perf_counter() - t
    n = next_id[0]
    stored = sum(p.stat().st_size for p in analog.log_path.rglob("*") if p.is_file())
    data_bytes = sum(p.stat().st_size for p in analog.log_path.rglob("*") if p.is_file() and "chunk" in p.name)
    med_plain, med_log = statistics.median(t_plain), statistics.median(t_log)
    return {
        "model": desc, "batch": batch, "examples": n, "modules": len(analog.modules), "rank": rank,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "plain_s": med_plain, "log_s": med_log, "overhead": med_log / med_plain,
        "ex_per_s": batch / med_log, "finalize_s": t_finalize,
        "bytes_per_example": (data_bytes or stored) / n, "store_bytes": stored,
        "rss_1x": rss[batches], "rss_4x": rss[4 * batches], "peak_rss": peak_rss_mib(),
        "examples_1x": 2 * batch + batches * batch,
    }


def table(rows) -> str:
    head = ("| model | batch | modules | plain step (s) | LoGra step (s) | overhead | examples/s | bytes/example "
            "| RSS after 1× (MiB) | RSS after 4× (MiB) | peak RSS (MiB) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['modules']} | {r['plain_s']:.4f} | {r['log_s']:.4f} | "
            f"{r['overhead']:.2f} | {r['ex_per_s']:.0f} | {r['bytes_per_example']:.0f} | "
            f"{r['rss_1x']:.0f} ({r['examples_1x']} ex.) | {r['rss_4x']:.0f} ({r['examples']} ex.) | "
            f"{r['peak_rss']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt2", "all"], default="all")
    parser.add_argument("--batches", type=int, default=10, help="N: RSS is read after N and 4N logged batches")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/logging.md")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model != "all":
        result = run_one(args.model, {"mlp": 64, "gpt2": 8}[args.model], args.batches, args.rank)
        print(json.dumps(result) if args.json else table([result]))
        return
    rows = []
    for name in ("mlp", "gpt2"):
        cmd = [sys.executable, __file__, "--model", name, "--batches", str(args.batches), "--rank", str(args.rank),
               "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    text = table(rows)
    print(text)
    if not args.no_write:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Logging benchmark\n\n"
            f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {mem:.0f} GiB, "
            f"torch {torch.__version__} (CPU), {torch.get_num_threads()} threads; shared machine, timings are "
            "medians of interleaved steps.\n\n"
            f"Command: `python benchmarks/bench_logging.py --batches {args.batches} --rank {args.rank}`\n\n"
            f"LoGra rank {args.rank} (r_out = r_in = {args.rank}), save=True to a temporary store (float32, "
            "flush_bytes 16 MiB), hessian \"kfac\", loss with reduction=\"sum\". Overhead = LoGra logging step / "
            "plain forward+backward step. bytes/example = chunk bytes on disk / examples.\n\n"
            f"{text}\n"
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
