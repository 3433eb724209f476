"""Read a log store back: validated metadata, zero-copy memory-mapped rows, split by module.

Rows are memory-mapped copy-on-write (``mode="c"``) as bytes and decoded by the store's codec
(analog.storage.encoding). In a float store, reading a contiguous range of one chunk is a view on
the page cache, never a copy, in the store's dtype; writes to the returned tensors never reach the
file. An int8, int4 or int2 store returns float32 x̂ (q · scale; int2: Rᵀ(level · σ)), dequantised from
the rows asked for only. ``field_rows`` (and ``batch`` given ``modules`` or ``kinds``) reads chosen
fields alone, decoding only their bytes; ``read_cost`` is the memory such a read takes per row.

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
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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
    def _spans(self, start: int, stop: int) -> Iterator[Tuple[int, np.ndarray]]:
        """(position of its first row, (k, row_bytes) uint8 mapped bytes) of each chunk's part of rows
        [start, stop), in order, each chunk checked (``_check_chunk``) before its bytes are given."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) out of range for {len(self)} examples")
        pos = start
        while pos < stop:
            c = bisect.bisect_right(self._starts, pos) - 1
            local = pos - self._starts[c]
            take = min(stop - pos, self._maps[c].shape[0] - local)
            self._check_chunk(c)
            yield pos, self._maps[c][local : local + take]
            pos += take

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as one (n, row_elems) tensor of ``torch_dtype``; zero-copy within one chunk
        of a float store, dequantised (a new float32 tensor) in a quantised (int8, int4, int2) store."""
        parts = [self.codec.decode(raw) for _, raw in self._spans(start, stop)]
        if not parts:
            return torch.empty(0, self.row_elems, dtype=self.torch_dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def field_rows(self, start: int, stop: int, f: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Field ``f`` (an index into ``fields``) of rows [start, stop) as (n, n_f) values, n_f the
        product of its shape, decoding that field's bytes only (analog.storage.encoding, ``decode_field``):
        in a float store a view of the map within one chunk, in a quantised store a new float32 tensor.
        With ``out`` (a (n, n_f) tensor of any float dtype) each chunk's part is converted straight into
        it and ``out`` is returned: the working memory is then one chunk part's decode, at most
        n · n_f · ``codec.work_bytes`` bytes (see ``read_cost``)."""
        self.codec.check_field(f)
        shape = (stop - start, self.codec.sizes[f])
        if out is not None:
            if tuple(out.shape) != shape:
                raise ValueError(f"field_rows: out must be {shape} for field {f} (module "
                                 f"{self.fields[f]['module']!r}, {self.fields[f]['kind']}) of rows [{start}, {stop}), "
                                 f"got {tuple(out.shape)}")
            for pos, raw in self._spans(start, stop):
                self.codec.decode_field(raw, f, out[pos - start : pos - start + len(raw)])
            return out
        parts = [self.codec.decode_field(raw, f) for _, raw in self._spans(start, stop)]
        if not parts:
            return torch.empty(shape, dtype=self.torch_dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def select(self, modules: Optional[Iterable[str]] = None, kinds: Optional[Iterable[str]] = None) -> List[int]:
        """Indices into ``fields`` of the fields of ``modules`` (default: every module) and ``kinds``
        (default: every kind), in store order. A module or kind the store does not hold is a KeyError
        naming it and those it holds."""
        wanted_modules = None if modules is None else list(dict.fromkeys(modules))
        wanted_kinds = None if kinds is None else list(dict.fromkeys(kinds))
        for what, wanted, held in (("module", wanted_modules, self.modules),
                                   ("log kind", wanted_kinds, list(dict.fromkeys(f["kind"] for f in self.fields)))):
            missing = [w for w in wanted or () if w not in held]
            if missing:
                raise KeyError(f"store {self.path} holds no {what} {missing}; it holds {held}")
        return [f for f, field in enumerate(self.fields)
                if (wanted_modules is None or field["module"] in wanted_modules)
                and (wanted_kinds is None or field["kind"] in wanted_kinds)]

    def read_cost(self, fields: Sequence[int], itemsize: int = 8) -> int:
        """Bytes one row costs when ``fields`` (indices into ``fields``) are read with ``field_rows`` into
        ``out`` tensors of ``itemsize`` bytes a value (8: float64), each field after the other::

            Σ_f (itemsize · n_f + read_bytes(f))  +  work_bytes · max_f n_f

        the outputs, which the batch holds together; the mapped bytes read, held in the page cache (a
        float store's n_f · its itemsize; a quantised store's scale and value bytes, analog.storage.encoding);
        and the working memory of decoding one field, freed before the next. B rows cost at most B times
        this, whatever the store's other fields. 0 when ``fields`` is empty."""
        if not fields:
            return 0
        codec = self.codec
        return (sum(itemsize * codec.sizes[f] + codec.read_bytes(f) for f in fields)
                + codec.work_bytes * max(codec.sizes[f] for f in fields))

    def gather(self, positions: Sequence[int]) -> torch.Tensor:
        """Rows at arbitrary positions (a copy)."""
        return torch.stack([self.rows(p, p + 1)[0] for p in positions]) if len(positions) else self.rows(0, 0)

    def split(self, rows: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
        """(B, row_elems) -> {module: {kind: (B, *shape)}} as views of ``rows`` (see analog.storage.rows)."""
        return split(rows, self.fields)

    def batch(self, start: int, stop: int, modules: Optional[Iterable[str]] = None,
              kinds: Optional[Iterable[str]] = None) -> LogBatch:
        """(ids, {module: {kind: (n, *shape)}}) of rows [start, stop). Without ``modules`` and ``kinds``
        every field, as views of ``rows``; with either, only the fields ``select`` picks, each decoded
        alone (``field_rows``: a quantised store decodes none of the other fields' bytes)."""
        if modules is None and kinds is None:
            return self.ids[start:stop], self.split(self.rows(start, stop))
        logs: Dict[str, Dict[str, torch.Tensor]] = {}
        for f in self.select(modules, kinds):
            field = self.fields[f]
            values = self.field_rows(start, stop, f)
            logs.setdefault(field["module"], {})[field["kind"]] = values.reshape(len(values), *field["shape"])
        return self.ids[start:stop], logs
