"""Background writer: batches of rows in, synced chunks out, memory bounded in bytes.

``write`` appends a batch (already on the CPU) to an in-memory buffer; once the buffer holds at
least ``flush_bytes`` it is handed to a writer thread through a queue of depth one, so at most
about 2 × flush_bytes are held and training waits on the disk only when the disk is slower than
logging. An exception in the thread is kept and raised in the caller at its next ``write``,
``flush`` or ``close`` — never lost.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from analog.storage.layout import (
    DTYPES,
    FORMAT_VERSION,
    STORE_FILE,
    StoreError,
    chunk_indices,
    chunk_name,
    read_json,
    row_elems,
    write_json_atomic,
)


class LogWriter:
    """Append rows of per-example logs to the store at ``path``."""

    def __init__(
        self,
        path,
        fields: List[Dict[str, Any]],
        dtype: str = "float32",
        fingerprint: Optional[dict] = None,
        flush_bytes: int = 64 * 2**20,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; use one of {sorted(DTYPES)}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.header = {
            "format": FORMAT_VERSION,
            "fields": fields,
            "dtype": dtype,
            "row_elems": row_elems(fields),
            "compression": fingerprint or {},
        }
        self.torch_dtype, self.np_dtype = DTYPES[dtype]
        self.flush_bytes = int(flush_bytes)
        self.ids = self._open_store()
        self._buffer: List[torch.Tensor] = []
        self._buffer_ids: List[Any] = []
        self._buffer_bytes = 0
        self._error: Optional[BaseException] = None
        self._queue: "queue.Queue" = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, name="analog-log-writer", daemon=True)
        self._thread.start()
        self.closed = False

    def _open_store(self) -> set:
        """Check an existing store's header; collect its ids; choose the next chunk index."""
        store_file = self.path / STORE_FILE
        found = chunk_indices(self.path)
        if store_file.exists():
            existing = read_json(store_file)
            for key in ("fields", "dtype", "compression"):
                if existing.get(key) != self.header[key]:
                    raise StoreError(
                        f"store {self.path} holds logs with different {key} than this run "
                        f"(stored {existing.get(key)!r}, now {self.header[key]!r}); use another project "
                        "or log name"
                    )
        else:
            write_json_atomic(store_file, self.header)
        ids = set()
        for index in found["json"]:
            ids.update(_hashable(i) for i in read_json(self.path / chunk_name(index, "json"))["ids"])
        self._next = max(found["bin"] + found["json"], default=-1) + 1
        return ids

    # -- caller side ------------------------------------------------------------------------
    def write(self, ids: Sequence[Any], rows: torch.Tensor) -> None:
        """Append ``rows`` (len(ids) × row_elems, any float dtype, CPU) for ``ids``."""
        self._raise_pending()
        if self.closed:
            raise StoreError(f"writer for {self.path} is closed")
        if rows.shape != (len(ids), self.header["row_elems"]):
            raise ValueError(f"rows of shape {tuple(rows.shape)} for {len(ids)} ids and "
                             f"{self.header['row_elems']} values per example")
        for i in ids:
            key = _hashable(i)
            if key in self.ids:
                raise ValueError(f"id {i!r} is already in store {self.path}; ids must be unique")
            self.ids.add(key)
        rows = rows.detach().to("cpu", self.torch_dtype).contiguous()
        self._buffer.append(rows)
        self._buffer_ids.extend(ids)
        self._buffer_bytes += rows.numel() * rows.element_size()
        if self._buffer_bytes >= self.flush_bytes:
            self._submit()

    def flush(self) -> None:
        """Hand the buffer to the thread and wait until everything is on disk."""
        self._submit()
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise_pending()

    def _submit(self) -> None:
        if not self._buffer:
            return
        rows = torch.cat(self._buffer)
        self._queue.put((self._next, list(self._buffer_ids), rows))
        self._next += 1
        self._buffer, self._buffer_ids, self._buffer_bytes = [], [], 0

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise StoreError(f"writing logs to {self.path} failed: {error!r}") from error

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

    def _write_chunk(self, index: int, ids: List[Any], rows: torch.Tensor) -> None:
        data = rows.view(torch.int16).numpy().view(np.uint16) if self.np_dtype is np.uint16 else rows.numpy()
        bin_path = self.path / chunk_name(index, "bin")
        with open(bin_path, "wb") as f:
            f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        meta = {"n": len(ids), "ids": ids, "nbytes": int(data.nbytes)}
        write_json_atomic(self.path / chunk_name(index, "json"), meta)


def _hashable(i: Any) -> Any:
    return tuple(i) if isinstance(i, list) else i
