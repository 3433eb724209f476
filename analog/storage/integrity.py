"""Integrity of a log store: checksums, chunk sequences, links; ``verify`` and ``repair``.

Every chunk's metadata records ``crc32`` of its ``.bin`` (and of its ``.stats`` file when it has
one), computed by the writer from the bytes it wrote. Readers check a chunk's checksum the first
time they read a row of it (``LogStore(verify=True)``, the default), once per file version and
process (``VERIFIED``), so a flipped byte or overwritten bytes are an error naming the file, never
gradients. Cost: benchmarks/results/integrity.md.

Structure checks (``sequence_problems``), made whenever a store is opened:

* each rank's chunks are numbered 0, 1, 2, … with no gap, except chunks ``repair`` dropped
  (listed in ``repair.json``) — a missing ``chunk_N.json`` with later chunks present is named;
* a ``.bin`` (or ``.stats``) without its ``.json`` *before* the rank's last complete chunk is named:
  such rows were complete once, so their metadata was lost, not never written. Only data past the
  last complete chunk is what a killed writer leaves (readers ignore it, the next writer removes it);
* store files are never symbolic links (analog writes none): a link is refused, not followed.

``repair_store`` drops every chunk that cannot be trusted (deleting its files, recording it in
``repair.json``) and returns what it dropped; the project's curvature must then be refitted
(``AnaLog.refit()``), which ``finalize()``/queries say since the store's digest changed.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from analog.storage.layout import (
    CHUNK_RE,
    STORE_FILE,
    StoreError,
    chunk_keys,
    chunk_name,
    read_chunk_meta,
    read_header,
    row_bytes,
    write_json_atomic,
)

REPAIR_FILE = "repair.json"
Key = Tuple[int, int]  # (rank, index)


def crc32(data) -> int:
    """CRC-32 of a bytes-like object (a numpy array or memory map is read without a copy)."""
    if isinstance(data, np.ndarray):
        data = memoryview(np.ascontiguousarray(data)).cast("B")
    return zlib.crc32(data) & 0xFFFFFFFF


#: file versions (see ``file_version``) whose CRC-32 this process has checked: a store read again
#: (e.g. one query batch after another) is not checksummed again until its files change
VERIFIED: set = set()


def file_version(path: Path, crc: int) -> tuple:
    """(path, inode, size, mtime in ns, recorded crc): changes whenever the file is rewritten."""
    st = os.stat(path)
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns, crc


def file_crc32(path: Path, block: int = 16 * 2**20) -> int:
    value = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                return value & 0xFFFFFFFF
            value = zlib.crc32(data, value)


def read_dropped(path: Path) -> List[Key]:
    """Chunks ``repair`` dropped from the store at ``path`` (so their gap is expected)."""
    file = Path(path) / REPAIR_FILE
    if not file.exists():
        return []
    try:
        dropped = json.loads(file.read_text(encoding="utf-8"))["dropped"]
        return [(int(r), int(i)) for r, i in dropped]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"corrupt repair record {file}: {e}") from None


def symlinks(path: Path) -> List[str]:
    """Files of the store that are symbolic links: store.json and the files of committed chunks
    (those with a ``.json``). Links among a killed writer's leftovers (data past the last complete
    chunk, temporary files) are not listed: the next writer removes them without following them."""
    entries = os.listdir(path)
    committed = {(m.group(1), m.group(2)) for m in map(CHUNK_RE.match, entries) if m and m.group(3) == "json"}
    return sorted(e for e in entries if os.path.islink(os.path.join(path, e)) and (
        e == STORE_FILE or (CHUNK_RE.match(e) and CHUNK_RE.match(e).group(1, 2) in committed)))


def sequence_problems(path: Path, keys: Dict[str, List[Key]], dropped: List[Key]) -> List[Tuple[Key, str]]:
    """Gaps in each rank's chunk sequence and data files whose metadata is missing, as (chunk, problem)."""
    problems = []
    complete = set(keys["json"]) | set(dropped)
    last = {}
    for r, i in keys["json"]:
        last[r] = max(last.get(r, -1), i)
    for r, top in last.items():
        for i in range(top):
            if (r, i) not in complete:
                has_bin = (r, i) in set(keys["bin"])
                problems.append(((r, i), f"{chunk_name(i, 'json', r)} is missing but later chunks of rank {r} exist"
                                 + (f" ({chunk_name(i, 'bin', r)} is there: its rows lost their ids)" if has_bin else
                                    " (a gap in the chunk sequence)")))
    return problems


def structure_problems(path: Path, keys: Dict[str, List[Key]]) -> List[str]:
    """What keeps the store at ``path`` (its ``chunk_keys``) from being read or appended to: gaps in a
    rank's chunk sequence, data whose metadata is missing, and links among its files."""
    problems = [p for _, p in sequence_problems(path, keys, read_dropped(path))]
    return problems + [f"{path / e} is a symbolic link (analog writes none; refused)" for e in symlinks(path)]


@dataclass
class StoreReport:
    """What ``inspect_store`` found: problems by chunk (None: the store as a whole), and what was checked."""

    path: Path
    examples: int = 0
    chunks: int = 0
    bytes_verified: int = 0
    problems: List[Tuple[Optional[Key], str]] = field(default_factory=list)
    dropped: List[Key] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> List[str]:
        out = [f"{self.path}: {self.chunks} chunks, {self.examples} examples, "
               f"{self.bytes_verified / 2**20:.1f} MiB checksummed"]
        out += [f"  problem: {p}" for _, p in self.problems]
        out += [f"  dropped: {chunk_name(i, 'json', r)} (and its data)" for r, i in self.dropped]
        if not self.problems and not self.dropped:
            out.append("  ok")
        return out


def inspect_store(path) -> StoreReport:
    """Check every chunk of the store at ``path`` (structure, sizes, checksums, duplicate ids);
    collects problems instead of raising at the first one."""
    path = Path(path)
    report = StoreReport(path)
    if os.path.islink(path / STORE_FILE):
        report.problems.append((None, f"{path / STORE_FILE} is a symbolic link"))
        return report
    header = read_header(path)
    size = row_bytes(header)
    keys = chunk_keys(path)
    for entry in symlinks(path):
        m = CHUNK_RE.match(entry)
        key = (int(m.group(1) or 0), int(m.group(2))) if m else None
        report.problems.append((key, f"{path / entry} is a symbolic link (refused)"))
    report.problems += sequence_problems(path, keys, read_dropped(path))
    seen: Dict[object, str] = {}
    for r, i in keys["json"]:
        meta, problem = _checked_chunk(path, r, i, size)
        if problem:
            report.problems.append(((r, i), problem))
            continue
        report.chunks += 1
        report.examples += meta["n"]
        report.bytes_verified += meta["n"] * size
        for data_id in meta["ids"]:
            key = tuple(data_id) if isinstance(data_id, list) else data_id
            if key in seen:
                report.problems.append(((r, i), f"id {data_id!r} of {chunk_name(i, 'json', r)} is also in {seen[key]}"))
                break
            seen[key] = chunk_name(i, "json", r)
    return report


def chunk_problem(path: Path, rank: int, index: int, size: int) -> str:
    """'' when chunk (rank, index) is sound: no links, metadata valid, sizes and checksums right (``size``:
    bytes per row, layout.row_bytes)."""
    return _checked_chunk(path, rank, index, size)[1]


def _checked_chunk(path: Path, rank: int, index: int, size: int) -> Tuple[Optional[dict], str]:
    """(its metadata, '') when chunk (rank, index) is sound, else (None or its metadata, the problem):
    one read of the metadata serves both the checks and the caller."""
    names = [chunk_name(index, ext, rank) for ext in ("json", "bin", "stats")]
    for name in names:
        if os.path.islink(path / name):
            return None, f"{path / name} is a symbolic link (refused)"
    try:
        meta = read_chunk_meta(path, index, size, rank)
    except StoreError as e:
        return None, str(e)
    if "crc32" in meta and meta["n"] and file_crc32(path / names[1]) != meta["crc32"]:
        return meta, f"{path / names[1]} does not match its checksum in {names[0]}: its bytes changed after writing"
    stats = meta.get("stats")
    if stats is not None:
        file = path / names[2]
        if not file.exists():
            return meta, f"missing {file} (its metadata {names[0]} records curvature statistics)"
        if file_crc32(file) != stats.get("crc32"):
            return meta, f"{file} does not match its checksum in {names[0]}: its bytes changed after writing"
    return meta, ""


def repair_store(path) -> StoreReport:
    """Drop every chunk ``inspect_store`` finds a problem with (its .json, .bin and .stats are deleted;
    a link is removed, never its target) and record the dropped chunks in ``repair.json``. Returns
    the report of what was found, with ``dropped`` filled in; the store then verifies clean.
    The caller holds the writer lock (see analog.store_cli)."""
    path = Path(path)
    report = inspect_store(path)
    bad = sorted({key for key, _ in report.problems if key is not None})
    if any(key is None for key, _ in report.problems):
        raise StoreError(f"store {path} cannot be repaired: " + "; ".join(p for k, p in report.problems if k is None))
    for r, i in bad:
        for ext in ("json", "bin", "stats"):
            (path / chunk_name(i, ext, r)).unlink(missing_ok=True)
    if bad:
        dropped = sorted(set(read_dropped(path)) | set(bad))
        write_json_atomic(path / REPAIR_FILE, {"dropped": [list(k) for k in dropped]})
    report.dropped = bad
    return report
