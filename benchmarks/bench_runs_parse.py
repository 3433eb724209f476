"""Run-log parsing cost: lines per second on a seed-format log, and CPU time against line length.

    python benchmarks/bench_runs_parse.py [--lines 50000] [--out benchmarks/results/runs_parse.md]

Part 1 parses ``--lines`` seed training lines (plus a validation line every 100) with
``LogParser``. Part 2 parses one adversarial line (a field with k spaces before its colon, the
shape that was quadratic) for k = 1k ... 1M and reports the CPU time and its growth per doubling of
k (2.0 = linear). ``--previous`` also times the field pattern the parser used before (a lazy key
followed by ``\\s*``), up to 32k spaces, to show the quadratic curve it replaced.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analog.runs.log_parser import LogParser  # noqa: E402

SEED_TRAIN = (
    "[Epoch 1/3] Step {} | Tokens: 1.6M | LM Loss: 10.4500 | Polar: 2.7497 | PPL: 34546.05 | "
    "LR: 8.19e-08 | GradNorm: 5.96 | Gate std: 0.0838 | Tok/s: 20555"
)
SEED_VAL = "[Validation] Loss: 3.3593, PPL: 28.77, Train/Val Gap: 0.83x"
PREVIOUS_FIELD = re.compile(r"^\s*([A-Za-z][\w /.\-]*?)\s*[:=]\s*(\S+)\s*$")


def cpu(fn, repeats=3, give_up=5.0) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
        if best > give_up:
            break
    return best


def throughput(n_lines: int) -> float:
    lines = []
    for i in range(1, n_lines + 1):
        lines.append(SEED_TRAIN.format(i))
        if i % 100 == 0:
            lines.append(SEED_VAL)
    seconds = cpu(lambda: LogParser().parse_lines(lines), repeats=1)
    return len(lines) / seconds


def adversarial(spaces: int) -> str:
    return "Step 1 | a" + " " * spaces + "b: 1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--previous", action="store_true", help="also time the previous field pattern")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runs_parse.md"))
    args = parser.parse_args(argv)
    rate = throughput(args.lines)
    sizes = [1000 * 2**i for i in range(11)]  # 1k ... 1M spaces
    rows, previous = [], {}
    for k in sizes:
        line = adversarial(k)
        rows.append((k, cpu(lambda line=line: LogParser().parse_lines([line]))))
        if args.previous and k <= 32_000:
            previous[k] = cpu(lambda line=line: PREVIOUS_FIELD.match(line.split("|", 1)[1]), repeats=1)
    command = "python benchmarks/bench_runs_parse.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Run-log parsing cost",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores; Python {platform.python_version()}. "
        f"CPU time (`time.process_time`, best of 3). Load average at the end {os.getloadavg()[0]:.1f} "
        "(shared machine: other jobs ran alongside).",
        "",
        f"Throughput: {rate:,.0f} lines/s on {args.lines:,} seed training lines (+1 validation line per 100).",
        "",
        "One line with a field of k spaces before its colon (`Step 1 | a<k spaces>b: 1`):",
        "",
        "| k spaces | CPU s | ratio to k/2 |" + (" previous pattern CPU s |" if previous else ""),
        "| ---: | ---: | ---: |" + (" ---: |" if previous else ""),
    ]
    for i, (k, seconds) in enumerate(rows):
        ratio = f"{seconds / rows[i - 1][1]:.2f}" if i and rows[i - 1][1] > 0 else "-"
        old = f" {previous[k]:.4f} |" if k in previous else (" - |" if previous else "")
        lines.append(f"| {k:,} | {seconds:.5f} | {ratio} |{old}")
    lines += ["", "A ratio near 2 per doubling is linear; the previous pattern's near 4 is quadratic."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
