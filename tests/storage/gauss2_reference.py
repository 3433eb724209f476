"""The 2-bit Gaussian Lloyd–Max code of int2 stores (analog.storage.encoding), written out in numpy for the
tests: per row and field σ = sqrt(mean x²) (here in float64), z = x / σ, code c = 0 (z < −T), 1 (−T ≤ z < 0),
2 (0 ≤ z < T) or 3 (z ≥ T), by comparisons (not analog's floor), x̂ = LEVEL[c] · σ; codes packed four a
byte, code j of the row in bits 2(j mod 4) of byte j // 4."""

import numpy as np

T = 0.9816
LEVELS = np.array([-1.5104, -0.4528, 0.4528, 1.5104], dtype=np.float32)
#: ||z| − T| below this: float32 rounding of σ may put the value in either code
NEAR = 1e-5


def gauss2_reference(x: np.ndarray, sizes):
    """(σ (n, F) float64, codes (n, E) uint8, near (n, E) bool: values within NEAR of a threshold)."""
    sig, codes, near = [], [], []
    offset = 0
    x = x.astype(np.float64)
    for size in sizes:
        xf = x[:, offset : offset + size]
        s = np.sqrt((xf**2).mean(1)) if size else np.zeros(len(x))
        z = xf / np.where(s > 0, s, 1.0)[:, None]
        codes.append(((z >= -T).astype(int) + (z >= 0) + (z >= T)).astype(np.uint8))
        near.append(np.abs(np.abs(z) - T) < NEAR)  # the sign of z is that of x: exact
        sig.append(s)
        offset += size
    return np.stack(sig, 1), np.concatenate(codes, 1), np.concatenate(near, 1)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, ceil(E/4)) uint8 by a plain Python loop: code j in bits 2(j mod 4), 2(j mod 4) + 1 of byte j // 4."""
    out = np.zeros((len(codes), (codes.shape[1] + 3) // 4), dtype=np.uint8)
    for r, row in enumerate(codes.tolist()):
        for j, c in enumerate(row):
            out[r, j // 4] |= c << (2 * (j % 4))
    return out
