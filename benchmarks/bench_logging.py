"""Logging benchmark: throughput, overhead vs a plain training step, memory, bytes per example, per store dtype.

For each model, plain steps (forward + backward) and LoGra logging steps (rank 64, save=True to a
temporary store, hessian "kfac", the default ``watch``) are interleaved and timed, one logging arm per
store dtype (``--dtypes``, default float32, int8 and int4; each arm its own AnaLog project on the same
model, so all arms log the same modules and fields). Each round runs the plain step and every arm once,
in an order rotated by one each round, so machine noise, the writer threads' background flushes and
cache order hit all steps alike. Times are medians over rounds; ratios are paired, the median over
rounds of the ratio within a round (on a shared machine the load drifts between rounds, and within a
round it hits both steps about alike): overhead = median(arm step / plain step), vs float32 =
median(arm step / float32 arm step), the cost of encoding rows to int8/int4 (absmax scale per row and
field, analog/storage/encoding.py) net of the smaller writes. Memory: peak RSS of the process, and the
current RSS after N and after 4N rounds (it must not grow with the number of examples logged: every
store streams to disk, bounded by ``flush_bytes``); these are of the process, so of all arms together.
Each model runs in its own subprocess so RSS is its own.

    python -m benchmarks.bench_logging                    # both models, writes benchmarks/results/logging.md
    python -m benchmarks.bench_logging --model gpt2 --batches 8 --dtypes float32,int8
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
DTYPES = ("float32", "int8", "int4")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(name: str, batch: int):
    """(model, step() -> summed loss of one fixed batch, description)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))

        def step():
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

        return model, step, "MLP 784-512-512-10"
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=128)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 1024, (batch, 128))

    def step():
        logits = model(input_ids=ids).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, 1024), ids[:, 1:].reshape(-1), reduction="sum")

    return model, step, "GPT-2 4 layers, width 256, seq 128, vocab 1024"


def make_arm(model, step, batch: int, rank: int, dtype: str, root: str):
    """One LoGra logging arm storing rows as ``dtype``: (AnaLog, logging step, next-id counter)."""
    from analog import AnaLog

    analog = AnaLog(project=f"bench-{dtype}", config={
        "root_dir": root, "compression": {"type": "logra", "rank": rank},
        "storage": {"dtype": dtype, "flush_bytes": 16 * 2**20}})
    analog.update({"log": ["grad"], "save": True, "hessian": "kfac"})
    analog.watch(model)  # the default watch: every module analog has a per-sample rule for
    counter = [0]

    def logging():
        ids = list(range(counter[0], counter[0] + batch))
        counter[0] += batch
        with analog(data_id=ids):
            step().backward()
        model.zero_grad(set_to_none=True)

    return analog, logging, counter


def encode_ms(dtype: str, fields, batch: int, repeats: int = 21) -> float:
    """Median ms to encode one batch of rows (batch × row_elems, float32) by the store's codec, alone."""
    from analog.storage.encoding import row_codec

    codec = row_codec(dtype, fields)
    rows = torch.randn(batch, codec.row_elems)
    codec.encode(rows)
    return 1e3 * statistics.median(timed(lambda: codec.encode(rows)) for _ in range(repeats))


def store_summary(analog, examples: int) -> dict:
    """Modules, fields and values per row from store.json; bytes per example = chunk bytes / examples."""
    files = [p for p in analog.log_path.rglob("*") if p.is_file()]
    meta = json.loads(next(p for p in files if p.name == "store.json").read_text())
    fields = meta["fields"]
    data = sum(p.stat().st_size for p in files if "chunk" in p.name) or sum(p.stat().st_size for p in files)
    return {"fields": len(fields), "modules": len({f["module"] for f in fields}),
            "row_elems": sum(int(torch.Size(f["shape"]).numel()) for f in fields),
            "store_dtype": meta["dtype"], "bytes_per_example": data / examples, "field_list": fields}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_one(name: str, batch: int, batches: int, rank: int, dtypes) -> dict:
    """Interleave the plain step and one logging arm per dtype for 4N rounds; medians, sizes, RSS."""
    torch.manual_seed(0)
    model, step, desc = build(name, batch)
    root = tempfile.mkdtemp(prefix="analog-bench-")
    arms = {d: make_arm(model, step, batch, rank, d, root) for d in dtypes}

    def plain():
        step().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (allocator, first store chunk, kernels)
        plain()
        for _, logging, _ in arms.values():
            logging()
    steps = {"plain": plain, **{d: arm[1] for d, arm in arms.items()}}
    order, t_arm, rss = list(steps), {name: [] for name in steps}, {}
    for i in range(4 * batches):  # one round: every step once, the order rotated by one each round
        for k in range(len(order)):
            name = order[(i + k) % len(order)]
            t_arm[name].append(timed(steps[name]))
        if i + 1 in (batches, 4 * batches):
            rss[i + 1] = rss_mib()
    t_plain = t_arm.pop("plain")
    med_plain = statistics.median(t_plain)
    base = t_arm.get("float32")

    def paired(num, den):  # median over rounds of the ratio within a round: slow load changes cancel
        return statistics.median(a / b for a, b in zip(num, den))

    rows = []
    for d, (analog, _, counter) in arms.items():
        t = time.perf_counter()
        analog.finalize()
        med = statistics.median(t_arm[d])
        summary = store_summary(analog, counter[0])
        if summary["store_dtype"] != d:
            raise RuntimeError(f"arm {d!r} wrote a {summary['store_dtype']!r} store")
        rows.append({"dtype": d, "log_s": med, "overhead": paired(t_arm[d], t_plain),
                     "vs_float32": paired(t_arm[d], base) if base else None,
                     "ex_per_s": batch / med, "finalize_s": time.perf_counter() - t, "examples": counter[0],
                     "encode_ms": encode_ms(d, summary.pop("field_list"), batch), **summary})
    return {"model": desc, "batch": batch, "rank": rank, "rounds": 4 * batches,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "plain_s": med_plain,
            "plain_ex_per_s": batch / med_plain, "arms": rows, "rss_1x": rss[batches], "rss_4x": rss[4 * batches],
            "peak_rss": peak_rss_mib(), "examples_1x": (2 + batches) * batch, "examples_4x": (2 + 4 * batches) * batch}


def table(results) -> str:
    """One row per (model, dtype); RSS columns are the model's process (all arms together)."""
    head = ("| model | batch | modules / fields | store dtype | plain step (s) | LoGra step (s) | overhead vs plain "
            "| vs float32 LoGra | encode alone (ms/batch) | examples/s | bytes/example | RSS after 1× (MiB) "
            "| RSS after 4× (MiB) | peak RSS (MiB) |")
    lines = [head, "|" + "---|" * 14]
    for r in results:
        rss = (f"{r['rss_1x']:.0f} ({r['examples_1x']} ex./arm) | {r['rss_4x']:.0f} ({r['examples_4x']} ex./arm) "
               f"| {r['peak_rss']:.0f}")
        for a in r["arms"]:
            vs = f"{a['vs_float32']:.2f}" if a["vs_float32"] is not None else "–"
            lines.append(
                f"| {r['model']} | {r['batch']} | {a['modules']} / {a['fields']} | {a['dtype']} | {r['plain_s']:.4f} "
                f"| {a['log_s']:.4f} | {a['overhead']:.2f} | {vs} | {a['encode_ms']:.2f} | {a['ex_per_s']:.0f} "
                f"| {a['bytes_per_example']:.0f} "
                f"| {rss} |")
    return "\n".join(lines)


def write_results(results, args, load: str) -> None:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    old = RESULTS.read_text().split("\n## Before", 1)[1] if RESULTS.exists() and "\n## Before" in RESULTS.read_text() \
        else None
    text = (
        "# Logging benchmark\n\n"
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {mem:.0f} GiB, "
        f"torch {torch.__version__} (CPU), {torch.get_num_threads()} threads; shared with other jobs "
        f"(load average {load} at the start), timings are medians of interleaved steps.\n\n"
        f"Command: `python -m benchmarks.bench_logging --batches {args.batches} --rank {args.rank} "
        f"--dtypes {','.join(args.dtypes)}`\n\n"
        f"LoGra rank {args.rank} (r_out = r_in = {args.rank}), the default `watch`, save=True to a temporary store "
        "(flush_bytes 16 MiB) in the dtype of the row, hessian \"kfac\", loss with reduction=\"sum\". "
        "Step times are medians over rounds (a round = the plain step and every arm once, the order rotated each "
        "round). Overhead = median over rounds of LoGra logging step / plain forward+backward step of the same "
        "round; vs float32 = median of that step / the float32 LoGra step of the same round (the int8/int4 "
        "encoding cost, net of the smaller writes); encode alone = median time of the store codec's encode of one "
        "batch of random rows (batch × values per row), nothing else running in the process. bytes/example = "
        "chunk bytes on disk / examples. RSS is of the model's process, which runs the plain step and every arm.\n\n"
        f"{table(results)}\n")
    if old is not None:
        text += "\n## Before" + old
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt2", "all"], default="all")
    parser.add_argument("--batches", type=int, default=10, help="N: RSS is read after N and 4N rounds")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES),
                        help="comma-separated store dtypes, one logging arm each (default float32,int8,int4)")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/logging.md")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from analog.config import STORE_DTYPES

    bad = [d for d in args.dtypes if d not in STORE_DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; one of {sorted(STORE_DTYPES)}")
    if args.model != "all":
        result = run_one(args.model, {"mlp": 64, "gpt2": 8}[args.model], args.batches, args.rank, args.dtypes)
        print(json.dumps(result) if args.json else table([result]))
        return
    load = "{:.2f} / {:.2f} / {:.2f} over 1 / 5 / 15 min".format(*os.getloadavg())
    results = []
    for name in ("mlp", "gpt2"):
        cmd = [sys.executable, "-m", "benchmarks.bench_logging", "--model", name, "--batches", str(args.batches),
               "--rank", str(args.rank), "--dtypes", ",".join(args.dtypes), "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(table(results))
    if not args.no_write:
        write_results(results, args, load)


if __name__ == "__main__":
    main()
