"""On-disk layout of a log store, and atomic metadata writes.

A store is a directory::

    store.json              fields (module, kind, per-example shape), dtype, compression fingerprint
    chunk_000000.bin        rows of one chunk: n rows of row_bytes bytes each (see below)
    chunk_000000.stats      optional: curvature statistics of the chunk's rows (safetensors, float64 sums)
    chunk_000000.json       {"n", "ids", "nbytes", "crc32", "stats": {"crc32"}}; written last, atomically
    repair.json             chunks dropped by `analog store repair` (their gap is expected)

    writer.lock             held (flock) by the one process appending to the store

A row is one example's logs, packed field after field (analog.storage.rows) and encoded by the
codec of the store's ``dtype`` (analog.storage.encoding): for ``float32|float16|bfloat16`` the
row_elems values in that dtype (row_bytes = row_elems × 4 or 2); for ``int8`` the F per-field
float32 scales followed by the row_elems int8 values (row_bytes = 4F + row_elems, no padding); for
``int4`` the F scales followed by the row_elems 4-bit values packed two a byte, low nibble first,
over the whole row (field boundaries may fall mid-byte; an odd row_elems pads the row's last byte
with a zero high nibble), so row_bytes = 4F + ceil(row_elems / 2); for ``int2`` the F per-field RMS
scales followed by 2-bit codes of each field's rotated values (store.json: ``"rotation"``), four a byte
(row_bytes = 4F + ceil(row_elems / 4)). Every row of a store has the same size, so a chunk of n rows is
n × row_bytes bytes. ``row_bytes(header)`` is the one place that size
is computed; writer, reader and integrity checks all take it from there.

Distributed runs (torch.distributed, world size W > 1): every rank appends its own shard to the
same directory. Rank 0 uses the names above; rank r > 0 writes ``chunk_r{r:03d}_NNNNNN.{bin,json}``
and holds ``writer.r{r:03d}.lock``. Every rank writes the same ``store.json`` (atomically, through
its own temporary file), which records ``world_size``; appending with another world size is an
error, since the store would mix shards of different runs. Readers take the chunks in order of
(rank, index), so the store reads as one: rank 0's examples, then rank 1's, and so on. Ranks must
log disjoint ids (e.g. through a ``DistributedSampler``): a writer refuses ids already on disk when
it opens and ids it logged itself, and a reader refuses a store holding an id twice, naming it.

A chunk exists for readers only once its ``.json`` is in place, and that file is written after its
``.bin`` (and its ``.stats``: the curvature statistics of its rows, e.g. K-FAC factor sums, as
safetensors) is complete and synced; the ``.json`` records ``crc32`` of both, so the rows, their
statistics and their ids are committed together (see analog.storage.integrity). A process killed
mid-write therefore leaves at most one ``.bin`` (and ``.stats``)
with no ``.json`` (and perhaps a ``*.tmp``), which readers ignore and the next writer removes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

from analog.storage.encoding import STORE_DTYPES, row_codec
from analog.storage.rows import row_elems

FORMAT_VERSION = 1
STORE_FILE = "store.json"
CHUNK_RE = re.compile(r"chunk_(?:r(\d{3,})_)?(\d{6})\.(bin|json|stats)$")
LOCK_FILE = "writer.lock"



class StoreError(RuntimeError):
    """A log store that is missing, corrupt, or not what the reader expects."""


def write_json_atomic(path: Path, payload: Any, tmp_suffix: str = ".tmp") -> None:
    """Write JSON to ``path`` through a synced temporary file and an atomic rename."""
    write_bytes_atomic(path, json.dumps(payload).encode("utf-8"), tmp_suffix)


def write_bytes_atomic(path: Path, data: bytes, tmp_suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` through a synced temporary file (``path`` + ``tmp_suffix``; give
    processes writing the same file different suffixes) and an atomic rename. The temporary file
    is created exclusively and never through a link (a stale one, or a link placed there, is
    removed first — the link itself, never its target)."""
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    with open_exclusive(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def open_exclusive(path: Path):
    """A new file at ``path`` opened for binary writing with O_CREAT | O_EXCL | O_NOFOLLOW: whatever
    was at ``path`` (a crashed run's leftover, or a symbolic link) is unlinked first, and if
    something appears there again meanwhile the open fails instead of writing through it."""
    path = Path(path)
    if os.path.lexists(path):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    if os.path.islink(path):
        raise StoreError(f"{path} is a symbolic link; analog writes no links into a store, so it refuses to "
                         "follow one (`analog store repair` removes it)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StoreError(f"missing file {path}") from None
    except OSError as e:
        raise StoreError(f"cannot read metadata file {path}: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"corrupt or truncated metadata file {path}: {e}") from None


def chunk_name(index: int, ext: str, rank: int = 0) -> str:
    """File name of chunk ``index`` written by ``rank`` (rank 0: the single-process name)."""
    return f"chunk_{index:06d}.{ext}" if rank == 0 else f"chunk_r{rank:03d}_{index:06d}.{ext}"


def lock_name(rank: int = 0) -> str:
    return LOCK_FILE if rank == 0 else f"writer.r{rank:03d}.lock"


def rank_tmp_suffix(rank: int = 0) -> str:
    """Temporary-file suffix of ``rank`` for files every rank writes (``store.json``)."""
    return ".tmp" if rank == 0 else f".r{rank:03d}.tmp"


def chunk_keys(root: Path) -> Dict[str, List[Tuple[int, int]]]:
    """(rank, index) of the chunk files present, by extension, in reading order."""
    found: Dict[str, List[Tuple[int, int]]] = {"bin": [], "json": [], "stats": []}
    for entry in os.listdir(root):
        m = CHUNK_RE.match(entry)
        if m:
            found[m.group(3)].append((int(m.group(1) or 0), int(m.group(2))))
    return {k: sorted(v) for k, v in found.items()}


def chunk_indices(root: Path, rank: int = 0) -> Dict[str, List[int]]:
    """Indices of the chunk files of ``rank`` present, by extension."""
    return {k: [i for r, i in v if r == rank] for k, v in chunk_keys(root).items()}


def read_header(path: Path) -> Dict[str, Any]:
    """The validated ``store.json`` of the store at ``path``."""
    file = path / STORE_FILE
    header = read_json(file)
    problem = _header_problem(header)
    if problem:
        raise StoreError(f"corrupt store metadata {file}: {problem}")
    return header


def _header_problem(header: Any) -> str:
    if not isinstance(header, dict):
        return f"expected a JSON object, found {type(header).__name__}"
    if header.get("format") != FORMAT_VERSION:
        return f"unsupported format {header.get('format')!r} (this analog reads format {FORMAT_VERSION})"
    if header.get("dtype") not in STORE_DTYPES:
        return f"unknown dtype {header.get('dtype')!r}"
    codec = row_codec(header["dtype"], [])
    for key, value in codec.header.items():
        if header.get(key) != value:
            return (f"its {header['dtype']} codes need {key!r}: {value!r}, found {header.get(key)!r}: it was written "
                    f"by an analog whose {header['dtype']} codec differs ({codec.header_missing}) and would decode "
                    "wrongly here; log it again")
    fields = header.get("fields")
    if not isinstance(fields, list) or not all(_field_ok(f) for f in fields):
        return f"'fields' must be a list of {{module, kind, shape}}, found {fields!r}"
    if header.get("row_elems") != row_elems(fields):
        return f"'row_elems' is {header.get('row_elems')!r} but the fields hold {row_elems(fields)} values"
    if not isinstance(header.get("compression"), dict):
        return f"'compression' must be an object, found {header.get('compression')!r}"
    ws = header.get("world_size", 1)
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        return f"'world_size' must be an integer >= 1, found {ws!r}"
    return ""


def row_bytes(header: Dict[str, Any]) -> int:
    """Bytes per row of the store whose (validated) ``store.json`` is ``header``: its codec's size
    (row_elems × itemsize for float dtypes, 4F + row_elems for int8, 4F + ceil(row_elems / 2) for int4,
    4F + ceil(row_elems / 4) for int2; see analog.storage.encoding)."""
    return row_codec(header["dtype"], header["fields"]).row_bytes


def stored_world_size(header: Dict[str, Any]) -> int:
    """The world size a store was written with (stores from before it was recorded: 1)."""
    return int(header.get("world_size", 1))


def _field_ok(field: Any) -> bool:
    return (isinstance(field, dict) and isinstance(field.get("module"), str) and isinstance(field.get("kind"), str)
            and isinstance(field.get("shape"), list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in field["shape"]))


def read_chunk_meta(path: Path, index: int, row_bytes: int, rank: int = 0) -> Dict[str, Any]:
    """The validated metadata of chunk ``index`` of ``rank``, after checking its ``.bin`` holds exactly
    its rows (size; the checksum is checked when rows are read, see analog.storage.integrity)."""
    meta_path, bin_path = path / chunk_name(index, "json", rank), path / chunk_name(index, "bin", rank)
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("n"), int) or meta["n"] < 0 \
            or not isinstance(meta.get("ids"), list):
        raise StoreError(f"corrupt chunk metadata {meta_path}: expected {{'n': int >= 0, 'ids': [...]}}")
    n = meta["n"]
    if len(meta["ids"]) != n:
        raise StoreError(f"corrupt chunk metadata {meta_path}: {len(meta['ids'])} ids for n={n}")
    crc, stats = meta.get("crc32"), meta.get("stats")
    if crc is not None and (not isinstance(crc, int) or isinstance(crc, bool)):
        raise StoreError(f"corrupt chunk metadata {meta_path}: 'crc32' must be an integer, found {crc!r}")
    if stats is not None and not (isinstance(stats, dict) and isinstance(stats.get("crc32"), int)):
        raise StoreError(f"corrupt chunk metadata {meta_path}: 'stats' must be {{'crc32': int}}, found {stats!r}")
    if os.path.islink(bin_path):
        raise StoreError(f"chunk data file {bin_path} is a symbolic link; analog writes no links into a store, so "
                         "it refuses to read one as gradients (`analog store repair` drops the chunk)")
    if not bin_path.exists():
        raise StoreError(f"missing chunk data file {bin_path} (its metadata {meta_path.name} says {n} examples)")
    size, expected = bin_path.stat().st_size, n * row_bytes
    if size != expected:
        raise StoreError(f"chunk data file {bin_path} has {size} bytes, expected {expected} "
                         f"({n} examples of {row_bytes} bytes); it is truncated or corrupt")
    return meta
