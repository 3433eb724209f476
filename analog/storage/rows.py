"""The row format of a log store: a batch's logs packed into one row per example, and split back.

A batch's logs ``{module: {kind: tensor (B, *shape)}}`` become one (B, row_elems) tensor whose
columns hold, field after field in the store's order, each tensor flattened in C order::

    row = [ logs[f₀.module][f₀.kind].reshape(B, -1) | logs[f₁.module][f₁.kind].reshape(B, -1) | … ]

``fields`` (``[{"module", "kind", "shape"}]``, written in ``store.json``) is the only description
of that layout: the writer packs with it and the reader splits with it, so they cannot disagree.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

Fields = List[Dict[str, Any]]
Logs = Dict[str, Dict[str, torch.Tensor]]


def fields_of(logs: Logs) -> Fields:
    """The fields of a batch's logs, in the order they are packed."""
    return [{"module": m, "kind": k, "shape": list(t.shape[1:])} for m, kinds in logs.items()
            for k, t in kinds.items()]


def field_size(field: Dict[str, Any]) -> int:
    return math.prod(int(s) for s in field["shape"])


def row_elems(fields: Fields) -> int:
    """Values per row: Σ over fields of the product of the field's shape."""
    return sum(field_size(f) for f in fields)


def pack(logs: Logs, fields: Fields, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, row_elems) rows of ``logs`` in ``dtype``, laid out as ``fields`` says, on the logs' device
    (the writer encodes them there and moves the encoded bytes to the CPU: for an int8 store a
    quarter of the float32 bytes cross from a GPU, for int4 an eighth).

    ``out``: a contiguous (B, row_elems) tensor of ``dtype`` on the logs' device to pack into (and
    return), e.g. a buffer reused from batch to batch; None: a new tensor.

    The batch's fields must be exactly ``fields`` (same modules, kinds, shapes and order); a batch
    that differs is an error naming both, so a store never mixes layouts."""
    found = fields_of(logs)
    if found != fields:
        raise ValueError(f"this batch's logs {found} differ in modules, kinds or shapes from the store's {fields}")
    parts = [logs[f["module"]][f["kind"]] for f in fields]
    if not parts:
        return torch.empty(0, 0, dtype=dtype)
    # the field's size, not -1: a batch of 0 rows or an empty field has 0 elements, which -1 cannot split
    flat = [t.reshape(t.shape[0], field_size(f)).to(dtype) for t, f in zip(parts, fields)]
    if out is None:
        return torch.cat(flat, 1)
    if out.shape != (len(flat[0]), row_elems(fields)) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"pack: out must be a contiguous ({len(flat[0])}, {row_elems(fields)}) {dtype} tensor, "
                         f"got {tuple(out.shape)} {out.dtype}")
    return torch.cat(flat, 1, out=out)


def split(rows: torch.Tensor, fields: Fields) -> Logs:
    """(B, row_elems) -> {module: {kind: (B, *shape)}} as views of ``rows`` (the inverse of ``pack``)."""
    out: Logs = {}
    offset = 0
    for field in fields:
        size = field_size(field)
        view = rows[:, offset : offset + size].reshape(rows.shape[0], *field["shape"])
        out.setdefault(field["module"], {})[field["kind"]] = view
        offset += size
    return out
