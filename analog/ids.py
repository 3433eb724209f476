"""Turning ``data_id`` into a list of per-example ids.

``data_id`` may be a list/tuple of ints or strings, a 1-D integer tensor or array (ids), or the
batch inputs themselves (any other tensor or array): then each example's id is a stable content
hash, the first 16 hex digits of SHA-1 over its dtype, shape and bytes — the same in every process.
"""

from __future__ import annotations

import hashlib
from typing import Any, List

import numpy as np
import torch


def content_hash(row: torch.Tensor) -> str:
    row = row.detach().to("cpu").contiguous()
    h = hashlib.sha1(f"{row.dtype}:{tuple(row.shape)}:".encode())
    h.update(row.reshape(-1).view(torch.uint8).numpy().tobytes() if row.numel() else b"")
    return h.hexdigest()[:16]


def to_ids(data_id: Any) -> List[Any]:
    if isinstance(data_id, np.ndarray):
        data_id = torch.from_numpy(data_id)
    if isinstance(data_id, torch.Tensor):
        if data_id.dim() == 1 and not data_id.is_floating_point() and data_id.dtype != torch.bool:
            return [int(i) for i in data_id.tolist()]
        if data_id.dim() == 0:
            raise ValueError("data_id is a scalar; pass one id per example")
        return [content_hash(row) for row in data_id]
    if isinstance(data_id, (list, tuple)):
        out = []
        for i in data_id:
            if isinstance(i, (bool, float)) or not isinstance(i, (int, str, np.integer)):
                raise TypeError(f"ids must be ints or strings, got {i!r} of type {type(i).__name__}")
            out.append(int(i) if isinstance(i, np.integer) else i)
        return out
    raise TypeError(f"data_id must be a list of ids or a tensor, not {type(data_id).__name__}")
