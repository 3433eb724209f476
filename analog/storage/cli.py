"""``analog store``: check a log store, or drop what cannot be trusted.

analog store verify PATH    every chunk: structure, sizes, CRC-32 of rows and statistics, duplicate
                            ids, links; and whether the project's curvature was fitted on this store
analog store repair PATH    drop every chunk verify finds a problem with (saying which), under the
                            writers' locks; the curvature is then fitted again by refit()/finalize()

PATH is a project directory (holding ``logs/``) or a store directory (holding ``store.json``).
Exit status: 0 when the store is sound (verify) or was repaired, 1 when verify found problems,
2 when PATH is not a store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

from analog.storage.integrity import inspect_store, repair_store
from analog.storage.layout import STORE_FILE, StoreError, read_header, stored_world_size
from analog.storage.writer import StoreLock


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("store", help="verify or repair a log store")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    commands = parser.add_subparsers(dest="store_command", metavar="{verify,repair}")
    verify = commands.add_parser("verify", help="check every chunk (sizes, checksums, sequence, links, ids)")
    verify.add_argument("path", help="a project directory or its logs/ directory")
    verify.set_defaults(func=_verify)
    repair = commands.add_parser("repair", help="drop the chunks verify finds problems with, and say which")
    repair.add_argument("path", help="a project directory or its logs/ directory")
    repair.set_defaults(func=_repair)
    return parser


def store_dir(path) -> Path:
    """The store directory of ``path`` (itself, or its ``logs/``); a StoreError when there is none."""
    path = Path(path)
    for candidate in (path, path / "logs"):
        if (candidate / STORE_FILE).exists() or (candidate / STORE_FILE).is_symlink():
            return candidate
    raise StoreError(f"no log store at {path}: neither {path / STORE_FILE} nor {path / 'logs' / STORE_FILE} exists")


def _curvature_line(store: Path, digest: str) -> List[str]:
    record = store.parent / "state" / "curvature.json"
    if store.name != "logs" or not record.exists():
        return []
    try:
        fitted_on = json.loads(record.read_text(encoding="utf-8")).get("fitted_on")
    except (OSError, ValueError, AttributeError):
        return [f"  curvature: {record} is unreadable; finalize() fits it again"]
    if fitted_on is None:
        return ["  curvature: fitted without a record of the store it was fitted on"]
    if fitted_on != digest:
        return ["  curvature: fitted on other contents of this store; refit() or finalize() fits it again"]
    return ["  curvature: fitted on this store"]


def _verify(args) -> int:
    from analog.storage.reader import LogStore

    try:
        path = store_dir(args.path)
        report = inspect_store(path)
    except StoreError as e:
        print(f"analog store verify: {e}")
        return 2
    lines = report.lines()
    if report.ok:
        lines += _curvature_line(path, LogStore(path, verify=False).digest())
    print("\n".join(lines))
    return 0 if report.ok else 1


def _repair(args) -> int:
    try:
        path = store_dir(args.path)
        world = stored_world_size(read_header(path))
        locks = []
        try:
            for rank in range(world):  # no writer of any rank may append meanwhile
                locks.append(StoreLock(path, rank))
            report = repair_store(path)
        finally:
            for lock in locks:
                lock.close()
    except StoreError as e:
        print(f"analog store repair: {e}")
        return 2
    print("\n".join(report.lines()))
    if report.dropped:
        print(f"dropped {len(report.dropped)} chunk(s); the project's curvature is fitted again by "
              "AnaLog(...).refit() or at the next finalize()")
    return 0
