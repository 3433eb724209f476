"""The fixed orthogonal rotation an int2 store applies to each field before its 2-bit code.

The 2-bit code (analog.storage.encoding) is the Lloyd–Max quantiser of a Gaussian. A field's values are
not always close to Gaussian: a LoGra sketch of a one-token example's gradient is the outer product
u vᵀ of two Gaussian vectors (heavy-tailed products), and an uncompressed gradient is sparse. A random
orthogonal rotation makes every coordinate a signed sum of all the field's values, so the rotated
values are close to Gaussian whatever the field holds, while norms and inner products are kept.

For a field of n values x (one module's one log kind of one row), R is the randomised Hadamard
transform::

    R x = H · D · x[π]            R⁻¹ y = (D · H y)[π⁻¹]        (H = Hᵀ = H⁻¹, D² = I, so Rᵀ R = I)

- π: a permutation of 0..n−1, the stable argsort of u_i (below); the identity when n is a power of
  two (one block: the signs alone make every value a signed sum of all of them);
- D = diag(d), d_i = +1 if the top bit of v_i is 0 else −1;
- H: block diagonal, one block per set bit of n in decreasing size (n = 2025 = 1024 + 512 + 256 + 128
  + 64 + 32 + 8 + 1 gives eight blocks), block m the normalised Sylvester–Hadamard matrix
  H_{2^m}[i, j] = (−1)^popcount(i AND j) / 2^{m/2} (a block of one value is 1).

The randomness is fixed, from splitmix64 in exact 64-bit integer arithmetic (so every machine and
version derives the same R): with s = splitmix64(n), u_i = splitmix64(s + 2i) and v_i =
splitmix64(s + 2i + 1), all modulo 2⁶⁴. R depends only on n.

splitmix64(z): z += 0x9E3779B97F4A7C15; z = (z ⊕ (z ≫ 30)) · 0xBF58476D1CE4E5B9;
z = (z ⊕ (z ≫ 27)) · 0x94D049BB133111EB; return z ⊕ (z ≫ 31).

Cost: H is applied as H_{2^a} ⊗ H_{2^b} ⊗ … with factors of at most 16 (the Sylvester matrix is the
Kronecker product of smaller ones in C order), i.e. n · Σ 2^{a_k} multiply-adds a row: 48 a value for
a LoGra rank-64 field (4,096 values). The rotation is computed in the rows' float dtype (float32), so
R⁻¹ R x = x to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import numpy as np
import torch

#: the Hadamard factors are applied as matrix products of 2^4 = 16 (see _hadamard_block)
_FACTOR_BITS = 4


def splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 (wrapping arithmetic, as the module docstring states)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def blocks(n: int) -> List[Tuple[int, int]]:
    """(offset, log2 size) of H's blocks for n values: one per set bit of n, largest first."""
    out, offset = [], 0
    for m in range(n.bit_length() - 1, -1, -1):
        if n >> m & 1:
            out.append((offset, m))
            offset += 1 << m
    return out


@functools.lru_cache(maxsize=64)
def _permutation_and_signs(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(π (n,) int64, d (n,) float32 ±1) of fields of n values."""
    s = splitmix64(np.uint64(n))
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = splitmix64(s + np.uint64(2) * i)
        v = splitmix64(s + np.uint64(2) * i + np.uint64(1))
    perm = np.arange(n, dtype=np.int64) if n & (n - 1) == 0 else np.argsort(u, kind="stable").astype(np.int64)
    signs = np.where(v >> np.uint64(63), -1.0, 1.0).astype(np.float32)
    return perm, signs


@functools.lru_cache(maxsize=16)
def _sylvester(bits: int) -> np.ndarray:
    """The (2^bits, 2^bits) ±1 Sylvester–Hadamard matrix, unnormalised: (−1)^popcount(i AND j)."""
    h = np.ones((1, 1), dtype=np.float32)
    for _ in range(bits):
        h = np.block([[h, h], [h, -h]])
    return h


class Rotation:
    """R and R⁻¹ for fields of ``n`` values, applied to (B, n) rows on their device and dtype."""

    def __init__(self, n: int):
        self.n = int(n)
        perm, signs = _permutation_and_signs(self.n)
        self._perm, self._signs = torch.from_numpy(perm), torch.from_numpy(signs)
        self._inverse = torch.from_numpy(np.argsort(perm).astype(np.int64))
        self._blocks = blocks(self.n)
        self._permutes = len(self._blocks) > 1  # π is the identity for one block (n a power of two)
        self._cache: dict = {}

    def _on(self, x: torch.Tensor):
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = (self._perm.to(x.device), self._signs.to(x.device, x.dtype),
                                self._inverse.to(x.device))
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n) -> (B, n) R x = H · D · x[π] (a new tensor)."""
        perm, signs, _ = self._on(x)
        return self._hadamard(x.index_select(1, perm).mul_(signs) if self._permutes else x * signs)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """(B, n) -> (B, n) R⁻¹ y = (D · H y)[π⁻¹] (a new tensor)."""
        _, signs, inverse = self._on(y)
        out = self._hadamard(y).mul_(signs)
        return out.index_select(1, inverse) if self._permutes else out

    def _hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """H x for (B, n) x, a new tensor (H is its own inverse)."""
        if len(self._blocks) == 1:
            return _hadamard_block(x, self._blocks[0][1])
        out = torch.empty_like(x)
        for offset, m in self._blocks:
            out[:, offset : offset + (1 << m)] = _hadamard_block(x[:, offset : offset + (1 << m)], m)
        return out


def _hadamard_block(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, 2^m) -> H_{2^m} x / 2^{m/2}: H_{2^m} = H_{2^p₁} ⊗ H_{2^p₂} ⊗ … (C order), each factor applied
    as one batched product along its axis of a reshape (B·pre, 2^p, post); factors of 16 (p = 4, the
    fastest on CPU), the first one smaller when 4 does not divide m."""
    if m == 0:
        return x.clone()
    n, rows = 1 << m, len(x)
    pieces = ([m % _FACTOR_BITS] if m % _FACTOR_BITS else []) + [_FACTOR_BITS] * (m // _FACTOR_BITS)
    y, pre = x, 1
    for p in pieces:
        f = 1 << p
        post = n // (pre * f)
        h = _sylvester_on(p, x.device, x.dtype)
        y = y.reshape(rows * pre, f) @ h if post == 1 else torch.matmul(h, y.reshape(rows * pre, f, post))
        pre *= f
    return y.reshape(rows, n).mul_(2.0 ** (-m / 2))


@functools.lru_cache(maxsize=64)
def _sylvester_on(bits: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(_sylvester(bits)).to(device, dtype)
