"""The absmax quantisation formula of int8/int4 stores (analog.storage.encoding), written out in numpy for
the storage tests: per row and field, s = max|x| / L (float32), q = clip(rint(x / s), −L, L), x̂ = q · s."""

import numpy as np


def absmax_reference(x: np.ndarray, sizes, levels: int):
    """(scales (n, F), q (n, E) int8, x̂ (n, E)) of rows ``x`` (n, E) split into fields of ``sizes``."""
    scales, qs, xhat = [], [], []
    offset = 0
    for size in sizes:
        xf = x[:, offset : offset + size]
        s = (np.abs(xf).max(1) / np.float32(levels)).astype(np.float32)
        div = np.where(s > 0, s, np.float32(1)).astype(np.float32)  # an all-zero field: scale 0, q 0
        q = np.clip(np.rint(xf / div[:, None]), -levels, levels).astype(np.int8)
        scales.append(s)
        qs.append(q)
        xhat.append(q.astype(np.float32) * s[:, None])
        offset += size
    return np.stack(scales, 1), np.concatenate(qs, 1), np.concatenate(xhat, 1)
