"""The 2-bit Gaussian Lloyd–Max code of int2 stores (analog.storage.encoding), written out in numpy and
plain Python for the tests: each field's n values are rotated by the dense n × n matrix R of the randomised
Hadamard transform, built here from its definition (splitmix64 in Python integers, the permutation by
sorting, H[i, j] = (−1)^popcount(i AND j) / √size per block), not by analog's factored product; then per
row and field σ = sqrt(mean y²) (here in float64), z = y / σ, code c = 0 (z < −T), 1 (−T ≤ z < 0),
2 (0 ≤ z < T) or 3 (z ≥ T), by comparisons (not analog's floor), x̂ = Rᵀ(LEVEL[c] · σ); codes packed four
a byte, code j of the row in bits 2(j mod 4) of byte j // 4."""

import functools

import numpy as np

T = 0.9816
LEVELS = np.array([-1.5104, -0.4528, 0.4528, 1.5104], dtype=np.float32)
#: ||z| − T| below this: float32 rounding of σ (and of the rotation) may put the value in either code
NEAR = 1e-4
_MASK = (1 << 64) - 1


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=None)
def rotation_matrix(n: int) -> np.ndarray:
    """(n, n) float64 R with R x = H · D · x[π] (analog.storage.rotation's definition)."""
    s = splitmix64(n)
    u = [splitmix64((s + 2 * i) & _MASK) for i in range(n)]
    v = [splitmix64((s + 2 * i + 1) & _MASK) for i in range(n)]
    one_block = bin(n).count("1") == 1
    perm = list(range(n)) if one_block else sorted(range(n), key=lambda i: (u[i], i))
    signs = [-1.0 if v[i] >> 63 else 1.0 for i in range(n)]
    h = np.zeros((n, n))
    offset = 0
    for m in range(n.bit_length() - 1, -1, -1):
        if n >> m & 1:
            size = 1 << m
            for i in range(size):
                for j in range(size):
                    h[offset + i, offset + j] = (-1.0) ** bin(i & j).count("1") / np.sqrt(size)
            offset += size
    pd = np.zeros((n, n))  # (D · x[π])_i = d_i x_{π(i)}
    for i in range(n):
        pd[i, perm[i]] = signs[i]
    return h @ pd


def rotate(x: np.ndarray, sizes, inverse: bool = False) -> np.ndarray:
    """(n, E) float64 rows with each field rotated by R (or by Rᵀ = R⁻¹ with ``inverse``)."""
    out, offset = [], 0
    for size in sizes:
        r = rotation_matrix(size) if size else np.zeros((0, 0))
        out.append(x[:, offset : offset + size].astype(np.float64) @ (r if inverse else r.T))
        offset += size
    return np.concatenate(out, 1) if out else x.astype(np.float64)


def gauss2_reference(x: np.ndarray, sizes):
    """(σ (n, F) float64, codes (n, E) uint8 of the rotated values, near (n, E) bool: rotated values within
    NEAR of a threshold)."""
    sig, codes, near = [], [], []
    offset = 0
    y = rotate(x, sizes)
    for size in sizes:
        yf = y[:, offset : offset + size]
        s = np.sqrt((yf**2).mean(1)) if size else np.zeros(len(x))
        z = yf / np.where(s > 0, s, 1.0)[:, None]
        codes.append(((z >= -T).astype(int) + (z >= 0) + (z >= T)).astype(np.uint8))
        near.append((np.abs(np.abs(z) - T) < NEAR) | ((np.abs(z) < NEAR) & (yf != 0)))
        sig.append(s)
        offset += size
    return np.stack(sig, 1), np.concatenate(codes, 1), np.concatenate(near, 1)


def gauss2_decoded(codes: np.ndarray, scales: np.ndarray, sizes) -> np.ndarray:
    """(n, E) float64 x̂ = Rᵀ(LEVEL[c] · σ) per field, from codes and the (float32) σ read from disk."""
    return rotate(LEVELS[codes].astype(np.float64) * np.repeat(scales.astype(np.float64), sizes, axis=1),
                  sizes, inverse=True)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, ceil(E/4)) uint8 by a plain Python loop: code j in bits 2(j mod 4), 2(j mod 4) + 1 of byte j // 4."""
    out = np.zeros((len(codes), (codes.shape[1] + 3) // 4), dtype=np.uint8)
    for r, row in enumerate(codes.tolist()):
        for j, c in enumerate(row):
            out[r, j // 4] |= c << (2 * (j % 4))
    return out
