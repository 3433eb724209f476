"""Read a log store back: validated metadata, zero-copy memory-mapped rows, split by module.

Rows are memory-mapped copy-on-write (``mode="c"``) as bytes and decoded by the store's codec
(analog.storage.encoding). In a float store, reading a contiguous range of one chunk is a view on
the page cache, never a copy, in the store's dtype; writes to the returned tensors never reach the
file. An int8, int4 or int2 store returns float32 x̂ (q · scale; int2: Rᵀ(level · σ)), dequantised from
the rows asked for only.

Integrity (analog.storage.integrity): opening checks the chunk sequence (gaps, data whose metadata
is missing) and refuses links; with ``verify=True`` (the default) each chunk's CRC-32 is checked
the first time a row of it is read — one pass over its bytes, once per LogStore. ``verify=False``
is the fast path for stores you trust (e.g. just verified with ``analog store verify``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load as load_tensors

from analog.storage.encoding import row_codec
from analog.storage.integrity import VERIFIED, crc32, file_version, structure_problems
from analog.storage.layout import (
    STORE_FILE,
    StoreError,
    chunk_keys,
    chunk_name,
    read_chunk_meta,
    read_header,
    stored_world_size,
)
from analog.storage.rows import split

#: (ids, {module: {kind: tensor (B, *shape)}})
LogBatch = Tuple[List[Any], Dict[str, Dict[str, torch.Tensor]]]


class LogStore:
    """A read-only view of the store at ``path``.

    ``expect_fields`` and ``expect_compression`` (each optional) must equal the store's; every
    module of the store must be among ``expect_modules`` (a watched module may have logged nothing,
    e.g. when frozen). A store written otherwise is a ``StoreError`` that shows both sides.
    """

    def __init__(
        self,
        path,
        expect_fields: Optional[list] = None,
        expect_compression: Optional[dict] = None,
        expect_modules: Optional[Sequence[str]] = None,
        verify: bool = True,
    ):
        self.path = Path(path)
        self.verify = bool(verify)
        self._expect = (expect_fields, expect_compression, expect_modules)
        if not (self.path / STORE_FILE).exists():
            raise StoreError(f"no log store at {self.path} (missing {self.path / STORE_FILE}); "
                             "log with save=True first")
        self.header = read_header(self.path)
        self.fields = self.header["fields"]
        self.row_elems = int(self.header["row_elems"])
        self.codec = row_codec(self.header["dtype"], self.fields)
        self.row_bytes = self.codec.row_bytes  # = layout.row_bytes(header), from the codec built here
        self.torch_dtype = self.codec.value_dtype  # of the rows returned (quantised stores: float32)
        self._check("fields", self.fields, expect_fields)
        self._check("compression", self.header.get("compression"), expect_compression)
        if expect_modules is not None:
            self._check_modules(list(expect_modules))
        self._open_chunks()

    def __getstate__(self):
        """Pickle as the path (e.g. for DataLoader workers started with spawn), not the mapped data."""
        return {"path": str(self.path), "expect": self._expect, "verify": self.verify}

    def __setstate__(self, state) -> None:
        self.__init__(state["path"], *state["expect"], verify=state.get("verify", True))

    def _check(self, what: str, stored, expected) -> None:
        if expected is not None and stored != expected:
            raise StoreError(
                f"store {self.path} was written with different {what} than expected:\n"
                f"  stored:   {stored!r}\n  expected: {expected!r}"
            )

    def _check_modules(self, expected: List[str]) -> None:
        unknown = [m for m in self.modules if m not in expected]
        if unknown:
            raise StoreError(
                f"store {self.path} holds logs of module(s) {unknown} that this reader does not watch:\n"
                f"  stored:  {self.modules}\n  watched: {expected}\n"
                "watch the same modules of the same architecture as the run that wrote it"
            )

    def _open_chunks(self) -> None:
        self.ids: List[Any] = []
        self._maps: List[np.ndarray] = []
        self._starts: List[int] = []
        self._metas: List[Dict[str, Any]] = []
        self._verified: set = set()
        world = stored_world_size(self.header)
        self._chunks: List[Tuple[int, int]] = []
        keys = chunk_keys(self.path)
        problems = structure_problems(self.path, keys)
        if problems:
            raise StoreError(f"store {self.path} cannot be trusted as it is: {'; '.join(problems)}. "
                             f"`analog store repair {self.path}` drops what cannot be trusted and says what")
        for rank, index in keys["json"]:  # (rank, index) order: the shards read as one
            if rank >= world:
                raise StoreError(
                    f"store {self.path} was written with world size {world} but holds chunk "
                    f"{chunk_name(index, 'json', rank)} of rank {rank}: it mixes logs from different world sizes")
            meta = read_chunk_meta(self.path, index, self.row_bytes, rank)
            n = meta["n"]
            self._starts.append(len(self.ids))
            self._chunks.append((rank, index))
            self._metas.append({k: v for k, v in meta.items() if k != "ids"})
            self.ids.extend(meta["ids"])
            if n and self.row_bytes:
                bin_path = self.path / chunk_name(index, "bin", rank)
                self._maps.append(np.memmap(bin_path, dtype=np.uint8, mode="c", shape=(n, self.row_bytes)))
            else:
                self._maps.append(np.zeros((n, self.row_bytes), dtype=np.uint8))
        self._index = {(tuple(i) if isinstance(i, list) else i): k for k, i in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            self._raise_duplicate()

    def _check_chunk(self, c: int) -> None:
        """Chunk ``c``'s bytes against the CRC-32 its metadata recorded, when ``verify``: once per file
        version (path, inode, size, mtime) and process, so repeated passes over a store pay once."""
        if not self.verify or c in self._verified:
            return
        expected = self._metas[c].get("crc32")
        rank, index = self._chunks[c]
        if expected is not None and self._maps[c].size:
            key = file_version(self.path / chunk_name(index, "bin", rank), expected)
            if key not in VERIFIED and crc32(self._maps[c]) != expected:
                raise StoreError(f"chunk data file {self.path / chunk_name(index, 'bin', rank)} does not match the "
                                 f"checksum in {chunk_name(index, 'json', rank)}: its bytes changed after they were "
                                 f"written. `analog store repair {self.path}` drops the chunk")
            VERIFIED.add(key)
        self._verified.add(c)

    def digest(self) -> str:
        """A short fingerprint of the store's content: (rank, index, n, crc32) of every chunk."""
        listing = [[r, i, m["n"], m.get("crc32")] for (r, i), m in zip(self._chunks, self._metas)]
        return hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16]

    def stat_sums(self) -> Dict[str, torch.Tensor]:
        """Σ over chunks of the curvature statistics committed with each chunk (float64), checked
        against their CRC-32; a chunk holding rows but no statistics is an error naming it."""
        total: Dict[str, torch.Tensor] = {}
        for (rank, index), meta in zip(self._chunks, self._metas):
            if not meta["n"]:
                continue
            file = self.path / chunk_name(index, "stats", rank)
            if meta.get("stats") is None:
                raise StoreError(f"chunk {chunk_name(index, 'json', rank)} of {self.path} has no curvature "
                                 "statistics (written by an analog from before they were stored with the rows): "
                                 "log again into a new project")
            if os.path.islink(file) or not file.exists():
                raise StoreError(f"missing or linked statistics file {file} of chunk {chunk_name(index, 'json', rank)}")
            blob = file.read_bytes()
            if crc32(blob) != meta["stats"]["crc32"]:
                raise StoreError(f"statistics file {file} does not match the checksum in "
                                 f"{chunk_name(index, 'json', rank)}: its bytes changed after they were written")
            for key, value in load_tensors(blob).items():
                total[key] = value if key not in total else total[key] + value
        return total

    def _raise_duplicate(self) -> None:
        """A store holding an id twice (e.g. two ranks logged the same example) cannot be read by id."""
        first: Dict[Any, int] = {}
        for k, i in enumerate(self.ids):
            key = tuple(i) if isinstance(i, list) else i
            if key in first:
                a, b = (self._chunk_of(p) for p in (first[key], k))
                raise StoreError(
                    f"store {self.path} holds id {i!r} twice (in {chunk_name(a[1], 'json', a[0])} and "
                    f"{chunk_name(b[1], 'json', b[0])}); ids must be unique across ranks: give each rank a "
                    "disjoint shard of the data (e.g. torch.utils.data.DistributedSampler with drop_last "
                    "or padding that does not repeat ids)")
            first[key] = k

    def _chunk_of(self, position: int) -> Tuple[int, int]:
        return self._chunks[bisect.bisect_right(self._starts, position) - 1]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modules(self) -> List[str]:
        return list(dict.fromkeys(f["module"] for f in self.fields))

    def holds(self, data_id: Any) -> bool:
        return (tuple(data_id) if isinstance(data_id, list) else data_id) in self._index

    def position(self, data_id: Any) -> int:
        try:
            return self._index[data_id]
        except KeyError:
            raise KeyError(f"id {data_id!r} is not in store {self.path}") from None

    # -- rows -------------------------------------------------------------------------------
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as one (n, row_elems) tensor of ``torch_dtype``; zero-copy within one chunk
        of a float store, dequantised (a new float32 tensor) in a quantised (int8, int4, int2) store."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) out of range for {len(self)} examples")
        parts = []
        pos = start
        while pos < stop:
            c = bisect.bisect_right(self._starts, pos) - 1
            local = pos - self._starts[c]
            take = min(stop - pos, self._maps[c].shape[0] - local)
            self._check_chunk(c)
            parts.append(self.codec.decode(self._maps[c][local : local + take]))
            pos += take
        if not parts:
            return torch.empty(0, self.row_elems, dtype=self.torch_dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gather(self, positions: Sequence[int]) -> torch.Tensor:
        """Rows at arbitrary positions (a copy)."""
        return torch.stack([self.rows(p, p + 1)[0] for p in positions]) if len(positions) else self.rows(0, 0)

    def split(self, rows: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
        """(B, row_elems) -> {module: {kind: (B, *shape)}} as views of ``rows`` (see analog.storage.rows)."""
        return split(rows, self.fields)

    def batch(self, start: int, stop: int) -> LogBatch:
        return self.ids[start:stop], self.split(self.rows(start, stop))
