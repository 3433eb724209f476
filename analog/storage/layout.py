"""On-disk layout of a log store, and atomic metadata writes.

A store is a directory::

    store.json              fields (module, kind, per-example shape), dtype, compression fingerprint
    chunk_000000.bin        rows of one chunk: n × row_elems values, C order, in the store dtype
    chunk_000000.json       {"n": n, "ids": [...], "nbytes": n·row_bytes}; written last, atomically

A chunk exists for readers only once its ``.json`` is in place, and that file is written after its
``.bin`` is complete and synced. A process killed mid-write therefore leaves at most one ``.bin``
with no ``.json``, which readers ignore and the next writer replaces.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

FORMAT_VERSION = 1
STORE_FILE = "store.json"
CHUNK_RE = re.compile(r"chunk_(\d{6})\.(bin|json)$")

#: store dtype name -> (torch dtype, numpy dtype used for the raw bytes)
DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),
}


class StoreError(RuntimeError):
    """A log store that is missing, corrupt, or not what the reader expects."""


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a synced temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StoreError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"corrupt or truncated metadata file {path}: {e}") from None


def chunk_name(index: int, ext: str) -> str:
    return f"chunk_{index:06d}.{ext}"


def chunk_indices(root: Path) -> Dict[str, List[int]]:
    """Indices of chunk files present, by extension."""
    found: Dict[str, List[int]] = {"bin": [], "json": []}
    for entry in os.listdir(root):
        m = CHUNK_RE.match(entry)
        if m:
            found[m.group(2)].append(int(m.group(1)))
    return {k: sorted(v) for k, v in found.items()}


def row_elems(fields: List[Dict[str, Any]]) -> int:
    total = 0
    for field in fields:
        n = 1
        for s in field["shape"]:
            n *= int(s)
        total += n
    return total
