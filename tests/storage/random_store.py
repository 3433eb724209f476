"""A log store of Gaussian rows at row-dependent magnitudes, written in several batches and chunks (storage and
fitting tests that read stores back field by field)."""

import math

import torch

from analog.storage import LogStore, LogWriter


def write_random_store(path, dtype, fields, n, flush_bytes, seed=0, decades=(-2, 2), per_write=4, id_of=str):
    """n rows x_i ~ N(0, I) · 10^(decades spread over the rows), written ``per_write`` rows a call with ids
    ``id_of(i)``; the LogStore read back."""
    gen = torch.Generator().manual_seed(seed)
    width = sum(math.prod(f["shape"]) for f in fields)
    x = torch.randn(n, width, generator=gen) * torch.logspace(*decades, n)[:, None]
    w = LogWriter(path, fields, dtype, flush_bytes=flush_bytes)
    for start in range(0, n, per_write):
        stop = min(start + per_write, n)
        w.write([id_of(i) for i in range(start, stop)], x[start:stop])
    w.close()
    return LogStore(path)
