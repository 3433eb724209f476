"""``analog runs``: compare training runs, report on one, or print quick summaries.

analog runs compare A.log B.log -o DIR [--names A B] [--align step|tokens] [--smooth N | --smoothing 0.9]
analog runs report A.log -o DIR
analog runs summary A.log [B.log ...]
"""

from __future__ import annotations

import argparse
import sys

from analog.runs.comparator import RunComparator, run_name
from analog.runs.log_parser import LogParseError, parse_training_log
from analog.runs.plots import require_matplotlib


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``runs`` command (sub-commands compare, report, summary) to ``subparsers``."""
    parser = subparsers.add_parser("runs", help="parse training logs, compare runs, plot and summarise")
    parser.set_defaults(func=lambda args: _usage(parser))
    commands = parser.add_subparsers(dest="runs_command", metavar="{compare,report,summary}")

    compare = commands.add_parser("compare", help="compare several runs: plots, table, report, JSON")
    compare.add_argument("logs", nargs="+", help="training logs (text, trainer_state.json, JSONL, CSV)")
    compare.add_argument("--names", nargs="+", help="one name per log (default: from the paths)")
    _add_output_options(compare)
    compare.set_defaults(func=_compare)

    report = commands.add_parser("report", help="plots, table, report and JSON for one run")
    report.add_argument("log", help="a training log")
    report.add_argument("--name", help="run name (default: from the path)")
    _add_output_options(report)
    report.set_defaults(func=_report)

    summary = commands.add_parser("summary", help="print headline numbers of each log")
    summary.add_argument("logs", nargs="+", help="training logs")
    summary.set_defaults(func=_summary)
    return parser


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output-dir", required=True, help="folder for the written files")
    parser.add_argument("--align", choices=["step", "tokens"], default="step", help="x axis (default: step)")
    smoothing = parser.add_mutually_exclusive_group()
    smoothing.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="N-point moving average drawn over the curves (default 1: none)",
    )
    smoothing.add_argument(
        "--smoothing", type=float, default=0.0, help="EMA weight in [0, 1) drawn over the curves (default 0)"
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _error(message: str) -> int:
    print(f"analog runs: error: {message}", file=sys.stderr)
    return 1


def _write(comparator: RunComparator, output_dir: str) -> int:
    comparator.print_comparison_table()
    files = comparator.generate_comparison(output_dir)
    print(f"\nwrote {len(files)} files to {output_dir}")
    return 0


def _compare(args) -> int:
    if args.names and len(args.names) != len(args.logs):
        return _error(f"{len(args.names)} names for {len(args.logs)} logs")
    names = args.names or [None] * len(args.logs)
    try:
        require_matplotlib()  # compare/report always draw: say so before parsing, printing or making the folder
        comparator = RunComparator(align=args.align, smoothing=args.smoothing, smooth_window=args.smooth)
        for name, log in zip(names, args.logs):
            comparator.add_run(name, log)
        return _write(comparator, args.output_dir)
    except (OSError, ValueError, ImportError) as error:
        return _error(str(error))


def _report(args) -> int:
    try:
        require_matplotlib()  # compare/report always draw: say so before parsing, printing or making the folder
        comparator = RunComparator(align=args.align, smoothing=args.smoothing, smooth_window=args.smooth)
        comparator.add_run(args.name, args.log)
        return _write(comparator, args.output_dir)
    except (OSError, ValueError, ImportError) as error:
        return _error(str(error))


def _summary(args) -> int:
    status = 0
    for log in args.logs:
        try:
            metrics = parse_training_log(log)
        except (OSError, LogParseError) as error:
            status = _error(str(error))
            continue
        print(f"{run_name(log)} ({log}, {metrics.format})")
        for key, value in metrics.config.items():
            print(f"  {'config.' + key:18s} {value}")
        for key, value in metrics.summary().items():
            shown = "-" if value is None else (f"{value:.6g}" if isinstance(value, float) else value)
            print(f"  {key:18s} {shown}")
        for example in metrics.malformed_examples:
            print(f"  malformed: {example}")
    return status
