"""The ``analog`` command line: one entry point, one sub-command per job.

Each job lives in its own module exposing ``add_parser(subparsers)``; the parser it adds sets
``func`` (called with the parsed namespace, returning an exit code). Modules are imported only
when their command is used, so a missing optional dependency of one job never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

#: sub-command name -> module that implements it
COMMANDS = {
    "demo": "analog.demo",
    "metrics": "analog.metrics.cli",
    "runs": "analog.runs.cli",
    "store": "analog.storage.cli",
}


DESCRIPTION = ("analog: data attribution (per-sample gradient logs, influence), checkpoint metrics, run logs "
               "and log stores from the command line")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analog", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMANDS.items():
        if wanted is not None and name != wanted:
            subparsers.add_parser(name, help=f"see `analog {name} --help`")
            continue
        module = importlib.import_module(module_name)
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one sub-command; returns its exit code.

    Output piped into a reader that stops early (``analog runs summary A.log | head``) ends quietly
    with status 141 (128 + SIGPIPE) instead of a ``BrokenPipeError`` traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # as the Python docs advise: point stdout at devnull so the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
