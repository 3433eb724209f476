"""``analog store``: check a log store, or drop what cannot be trusted.

analog store verify PATH    every chunk: structure, sizes, CRC-32 of rows and statistics, duplicate
                            ids, links; and whether the project's curvature was fitted on this store
analog store repair PATH    drop every chunk verify finds a problem with (saying which), under the
                            writers' locks; the curvature is then fitted again by refit()/finalize()

PATH is a project directory (holding ``logs/``) or a store directory (holding ``store.json``). A
project's every segment is checked (``logs/`` and ``segments/NNNN/logs/``), each under its own header.
Exit status: 0 when every store is sound (verify) or was repaired, 1 when verify found problems,
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


def store_dirs(path) -> List[Path]:
    """Every store under ``path``: the store itself, or a project's segment 0 (``logs/``) and its later
    segments (``segments/NNNN/logs/``, in order); a StoreError when there is none."""
    path = Path(path)
    segments = sorted(path.glob("segments/[0-9][0-9][0-9][0-9]/logs"))
    found = [d for d in segments if (d / STORE_FILE).exists() or (d / STORE_FILE).is_symlink()]
    try:
        return [store_dir(path), *found]
    except StoreError:
        if found and path.name != "logs":
            return found
        raise


def lock_dirs(store: Path) -> List[Path]:
    """Directories whose writer locks guard ``store``: itself, and for a later segment's store
    (``project/segments/NNNN/logs``, see analog.trajectory.layout) the project's ``logs/``, whose
    lock the logging process holds for every segment (analog.state.ProjectState.acquire)."""
    dirs = [store]
    if store.name == "logs" and store.parent.parent.name == "segments":
        project_logs = store.parent.parent.parent / "logs"
        if project_logs.is_dir():
            dirs.append(project_logs)
    return dirs


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
        paths = store_dirs(args.path)
        reports = [(path, inspect_store(path)) for path in paths]
    except StoreError as e:
        print(f"analog store verify: {e}")
        return 2
    lines = []
    for path, report in reports:
        lines += report.lines()
        if report.ok:
            lines += _curvature_line(path, LogStore(path, verify=False).digest())
    print("\n".join(lines))
    return 0 if all(report.ok for _, report in reports) else 1


def _repair(args) -> int:
    try:
        reports = [_repair_one(path) for path in store_dirs(args.path)]
    except StoreError as e:
        print(f"analog store repair: {e}")
        return 2
    dropped = 0
    for report in reports:
        print("\n".join(report.lines()))
        dropped += len(report.dropped)
    if dropped:
        print(f"dropped {dropped} chunk(s); the project's curvature is fitted again by "
              "AnaLog(...).refit() or at the next finalize()")
    return 0


def _repair_one(path: Path):
    world = stored_world_size(read_header(path))
    locks = []
    try:
        for directory in lock_dirs(path):
            for rank in range(world):  # no writer of any rank may append meanwhile
                locks.append(StoreLock(directory, rank))
        return repair_store(path)
    finally:
        for lock in locks:
            lock.close()
