"""Background writer: batches of rows in, synced chunks out, memory bounded in bytes.

``write`` encodes a batch by the store's codec (analog.storage.encoding: cast to the store dtype,
or quantised to int8, int4 or int2 with per-field scales) on the rows' device, and appends the encoded bytes,
moved to the CPU, to an in-memory buffer; once the buffer holds at
least ``flush_bytes`` it is handed to a writer thread. A new chunk is handed over only after the
previous one is on disk (double buffering), so the writer holds at most two chunks — each under
``flush_bytes`` plus one batch — and training waits on the disk only when the disk is slower than
logging. The buffer holds the encoded rows, so ``flush_bytes`` counts bytes as they will be on
disk. The writer may keep references to the rows it is given (a float store of the rows' own dtype
encodes without a copy): do not modify them in place after ``write``.

A quantised (int8, int4, int2) store's codec copies (it returns new bytes), so the writer stages the values it
quantises in one float32 buffer of (largest batch so far) × row_elems, reused batch after batch on
the rows' device: ``write_logs`` packs the logs into it and ``write`` copies the rows into it (the
caller's rows are never modified), and the codec divides, rounds and clamps there in place. Reusing
it saves a copy and, on the CPU, the page faults of a fresh batch-sized allocation per batch (memory
the allocator had returned to the OS), which cost about as much as the quantisation itself. It is
held until ``close``, in addition to the two chunks above.

An exception in the thread is kept and raised in the caller at its next ``write``, ``flush`` or
``close`` — never lost — and at every later call: a writer that failed once writes nothing more.

A writer still open when the interpreter exits normally (no ``finalize()``) is flushed and closed
by an ``atexit`` handler, with a warning, so buffered rows are not lost; only a killed process loses
the rows it had not yet handed over.

One process at a time may append to a store: the writer holds an advisory lock on
``writer.lock`` (released by the OS when the process dies, so a killed run does not block the
next one). Under torch.distributed each rank appends its own shard with its own chunk names and
lock (see analog.storage.layout); ``rank``/``world_size`` default to the process group's.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from safetensors.torch import save as save_tensors

from analog.storage.encoding import STORE_DTYPES, NonFiniteRows, row_codec
from analog.storage.integrity import structure_problems
from analog.storage.layout import (
    CHUNK_RE,
    FORMAT_VERSION,
    STORE_FILE,
    StoreError,
    chunk_keys,
    chunk_name,
    lock_name,
    open_exclusive,
    rank_tmp_suffix,
    read_chunk_meta,
    read_header,
    stored_world_size,
    write_json_atomic,
)
from analog.storage.rows import pack, row_elems

try:  # advisory locking; unavailable on Windows, where the lock is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None



class NonFiniteBatch(ValueError):
    """A batch holding NaN or ±Inf in ``module``'s ``kind`` log at ``ids``, which a quantised store cannot
    hold; nothing of the batch was stored."""

    def __init__(self, module: str, kind: str, ids: List[Any], dtype: str, path):
        self.module, self.kind, self.ids = module, kind, ids
        super().__init__(f"non-finite values in module {module!r} ({kind} log) for ids {ids[:10]}: an {dtype} "
                         f"store cannot hold NaN or Inf; nothing of this batch was stored in {path}")


class LogWriter:
    """Append rows of per-example logs to the store at ``path``."""

    def __init__(
        self,
        path,
        fields: List[Dict[str, Any]],
        dtype: str = "float32",
        fingerprint: Optional[dict] = None,
        flush_bytes: int = 64 * 2**20,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        lock: Optional["StoreLock"] = None,
    ):
        from analog import distributed

        self.rank = distributed.rank() if rank is None else int(rank)
        self.world_size = distributed.world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; use one of {list(STORE_DTYPES)}")
        if int(flush_bytes) < 1:
            raise ValueError(f"flush_bytes must be positive, got {flush_bytes}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.header = {
            "format": FORMAT_VERSION,
            "fields": fields,
            "dtype": dtype,
            "row_elems": row_elems(fields),
            "compression": fingerprint or {},
            "world_size": self.world_size,
        }
        self.codec = row_codec(dtype, fields)
        self.header.update(self.codec.header)
        self.row_bytes = self.codec.row_bytes  # = layout.row_bytes(header), from the codec built here
        self.flush_bytes = int(flush_bytes)
        # a lock handed in (by the project's state owner, which holds it across logging and fitting)
        # stays with its owner; otherwise the writer takes its own and releases it in close()
        self._own_lock = lock is None
        self._lock = StoreLock(self.path, self.rank) if lock is None else lock
        try:
            self.ids = self._open_store()
        except BaseException:
            if self._own_lock:
                self._lock.close()
            raise
        self._buffer: List[torch.Tensor] = []
        self._buffer_ids: List[Any] = []
        self._buffer_bytes = 0
        self._buffer_stats: Dict[str, torch.Tensor] = {}
        self._staging: Optional[torch.Tensor] = None  # float32 values to quantise (quantised stores), reused
        self._error: Optional[BaseException] = None
        self._queue: "queue.Queue" = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="analog-log-writer", daemon=True)
        self._thread.start()
        self.closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    def _open_store(self) -> set:
        """Check an existing store; collect its ids; drop a crashed run's leftovers; pick the next chunk."""
        if (self.path / STORE_FILE).exists():
            existing = read_header(self.path)
            if stored_world_size(existing) != self.world_size:
                raise StoreError(
                    f"store {self.path} holds logs written by {stored_world_size(existing)} process(es) but this "
                    f"run has world size {self.world_size}: mixing logs from different world sizes in one store is "
                    "not supported; log to another project (or run with the same number of processes)")
            for key in ("fields", "dtype", "compression"):
                if existing.get(key) != self.header[key]:
                    raise StoreError(
                        f"store {self.path} holds logs with different {key} than this run "
                        f"(stored {existing.get(key)!r}, now {self.header[key]!r}); use another project "
                        "or log name"
                    )
        else:  # every rank writes the same header, each through its own temporary file
            write_json_atomic(self.path / STORE_FILE, self.header, rank_tmp_suffix(self.rank))
        found = chunk_keys(self.path)
        problems = structure_problems(self.path, found)
        if problems:
            raise StoreError(f"store {self.path} cannot be appended to: {'; '.join(problems)}; "
                             f"run `analog store repair {self.path}` to drop what cannot be trusted")
        ids = set()
        for r, index in found["json"]:  # every rank's complete chunks: ids already on disk are refused
            ids.update(_hashable(i) for i in read_chunk_meta(self.path, index, self.row_bytes, r)["ids"])
        self._next = max((i for r, i in found["json"] if r == self.rank), default=-1) + 1
        self._remove_leftovers([i for r, i in found["bin"] + found["stats"] if r == self.rank])
        return ids

    def _remove_leftovers(self, bins: List[int]) -> None:
        """Remove what a killed writer of this rank left: chunk data past its last complete chunk,
        temporary files (other ranks' files are theirs: they may be writing them right now)."""
        for index in bins:
            if index >= self._next:
                for ext in ("bin", "stats"):
                    (self.path / chunk_name(index, ext, self.rank)).unlink(missing_ok=True)
        own_tmp = STORE_FILE + rank_tmp_suffix(self.rank)
        for entry in os.listdir(self.path):
            if entry == own_tmp or (entry.endswith(".json.tmp") and _chunk_rank(entry) == self.rank):
                (self.path / entry).unlink(missing_ok=True)

    # -- caller side ------------------------------------------------------------------------
    def write(self, ids: Sequence[Any], rows: torch.Tensor, stats: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Append ``rows`` (len(ids) × row_elems, any float dtype and device) for ``ids``, encoded by the
        store's codec. ``stats``: sums over these rows (e.g. K-FAC's Σ a aᵀ) added up per chunk and
        committed with it, in float64 (never quantised)."""
        self._raise_pending()
        if self.closed:
            raise StoreError(f"writer for {self.path} is closed")
        ids = list(ids)
        if tuple(rows.shape) != (len(ids), self.header["row_elems"]):
            raise ValueError(f"rows of shape {tuple(rows.shape)} for {len(ids)} ids and "
                             f"{self.header['row_elems']} values per example")
        self._check_new(ids)
        try:
            if self.codec.copies:
                staged = self._stage(len(ids), rows.device)
                if staged.data_ptr() != rows.data_ptr():
                    staged.copy_(rows.detach())  # not packed there by write_logs: copied (and cast)
                data = self.codec.encode(staged, overwrite=True).to("cpu")
            else:
                data = self.codec.encode(rows).to("cpu")
        except NonFiniteRows as e:
            raise NonFiniteBatch(e.field["module"], e.field["kind"], [ids[i] for i in e.rows], self.header["dtype"],
                                 self.path) from None
        self.ids.update(_hashable(i) for i in ids)
        self._buffer.append(data)
        self._buffer_ids.extend(ids)
        self._buffer_bytes += data.numel()
        for key, value in (stats or {}).items():
            value = value.detach().double()
            self._buffer_stats[key] = value if key not in self._buffer_stats else self._buffer_stats[key] + value
        if self._buffer_bytes >= self.flush_bytes:
            self._submit()

    def write_logs(self, ids: Sequence[Any], logs, stats: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Append a batch's logs ``{module: {kind: (B, *shape)}}``, packed by analog.storage.rows.pack
        (for an quantised store into the staging buffer, which ``write`` then quantises in place)."""
        first = next((t for kinds in logs.values() for t in kinds.values()), None)
        out = None
        if self.codec.copies and first is not None and first.dim() and len(first) == len(ids):
            out = self._stage(len(first), first.device)
        self.write(ids, pack(logs, self.header["fields"], self.codec.value_dtype, out), stats)

    def _stage(self, n: int, device: torch.device) -> torch.Tensor:
        """The first ``n`` rows of the float32 staging buffer on ``device`` (grown or moved as needed)."""
        if self._staging is None or len(self._staging) < n or self._staging.device != device:
            self._staging = None  # released before its successor is allocated
            self._staging = torch.empty(n, self.header["row_elems"], dtype=torch.float32, device=device)
        return self._staging[:n]

    def holds(self, data_id: Any) -> bool:
        """Whether ``data_id`` is on disk or handed to this writer."""
        return _hashable(data_id) in self.ids

    def _check_new(self, ids: List[Any]) -> None:
        """Refuse a batch (as a whole) holding an id twice or an id already logged."""
        seen = set()
        for i in ids:
            key = _hashable(i)
            if key in self.ids:
                raise ValueError(f"id {i!r} is already in store {self.path}; ids must be unique "
                                 "(nothing of this batch was stored)")
            if key in seen:
                raise ValueError(f"id {i!r} appears twice in one batch; ids must be unique "
                                 "(nothing of this batch was stored)")
            seen.add(key)

    def flush(self) -> None:
        """Hand the buffer to the thread and wait until everything is on disk."""
        self._submit()
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Flush and stop the thread; raises a pending write error (again on every later call)."""
        if self.closed:
            self._raise_pending()
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._staging = None
            self._queue.put(None)
            self._thread.join()
            if self._own_lock:
                self._lock.close()
        self._raise_pending()

    def _submit(self) -> None:
        """Hand the buffer over once the previous chunk is on disk (at most two chunks held)."""
        if not self._buffer:
            return
        self._queue.join()
        self._raise_pending()
        stats = {k: v.cpu().contiguous() for k, v in self._buffer_stats.items()}
        self._queue.put((self._next, self._buffer_ids, self._buffer, stats))
        self._next += 1
        self._buffer, self._buffer_ids, self._buffer_bytes, self._buffer_stats = [], [], 0, {}

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing logs to {self.path} failed: {self._error!r}; logs from then on "
                             "were not stored") from self._error

    # -- thread side ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._write_chunk(*item)
            except BaseException as e:  # kept and raised in the caller
                self._error = e
            finally:
                self._queue.task_done()

    def _write_chunk(self, index: int, ids: List[Any], parts: List[torch.Tensor],
                     stats: Dict[str, torch.Tensor]) -> None:
        """The rows and their statistics, synced, then the chunk's metadata with both checksums,
        atomically: a chunk (rows, statistics, ids) is complete or absent."""
        nbytes, crc = 0, 0
        with open_exclusive(self.path / chunk_name(index, "bin", self.rank)) as f:
            for rows in parts:  # (B, row_bytes) uint8, encoded by write()
                data = memoryview(rows.reshape(-1).numpy())
                f.write(data)
                crc = zlib.crc32(data, crc)
                nbytes += data.nbytes
            f.flush()
            os.fsync(f.fileno())
        meta = {"n": len(ids), "ids": ids, "nbytes": nbytes, "crc32": crc & 0xFFFFFFFF}
        if stats:
            blob = save_tensors(stats)
            with open_exclusive(self.path / chunk_name(index, "stats", self.rank)) as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            meta["stats"] = {"crc32": zlib.crc32(blob) & 0xFFFFFFFF}
        write_json_atomic(self.path / chunk_name(index, "json", self.rank), meta)


class StoreLock:
    """An exclusive advisory lock on ``rank``'s lock file; a no-op where ``fcntl`` is missing."""

    def __init__(self, path: Path, rank: int = 0):
        self.file = None
        if fcntl is None:  # pragma: no cover
            return
        lock = path / lock_name(rank)
        self.file = open(lock, "a+b")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise StoreError(f"store {path} is being written by another writer (lock {lock} is "
                             "held); finalize() that run first, or log to another project") from None

    def close(self) -> None:
        """Release the lock, also for processes forked meanwhile (they share the open file)."""
        if self.file is not None and not self.file.closed:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            finally:
                self.file.close()


def _chunk_rank(entry: str) -> Optional[int]:
    """The rank whose chunk file (or its temporary file) ``entry`` is, or None."""
    m = CHUNK_RE.match(entry[: -len(".tmp")] if entry.endswith(".tmp") else entry)
    return int(m.group(1) or 0) if m else None


def _hashable(i: Any) -> Any:
    return tuple(i) if isinstance(i, list) else i


def _close_at_exit(ref) -> None:
    writer = ref()
    if writer is None or writer.closed:
        return
    warnings.warn(f"analog: the process exits with logs of {writer.path} not finalized; flushing them now "
                  "(call analog.finalize() to also fit the curvature)")
    try:
        writer.close()
    except Exception as e:  # at exit there is nobody left to raise to
        print(f"analog: flushing {writer.path} at exit failed: {e!r}")
