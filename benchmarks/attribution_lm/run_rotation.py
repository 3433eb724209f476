"""run.py with int2's rotation (analog.storage.rotation.Rotation) replaced by another one, to see how much of
a result is the rotation in general and how much the one fixed R analog ships (summary run 17). Benchmark
only: the library is not changed; every other argument goes to run.py as it is.

    python -m benchmarks.attribution_lm.run_rotation ROTATION [run.py arguments ...]

ROTATION, for fields of n values:

- ``analog``: analog's own R (splitmix64 signs; the same as running run.py);
- ``none``: R = I (int2 as before 2026-12-06: the 2-bit code on the values as they are);
- ``h:S``: H · D with analog's Hadamard blocks and permutation but the signs d ∈ {±1}ⁿ drawn by
  ``torch.randint(0, 2, (n,))`` from a generator seeded with S;
- ``h2:S``: H · D₂ · H · D₁ (two rounds; d₁ then d₂ drawn as in ``h:S``), for n a power of two (else analog's R);
- ``qr:S``: a Haar-random orthogonal Q: the QR factors of an n × n standard Gaussian matrix (float64, generator
  seeded with S · 1000003 + n), Q's columns signed by diag(R) — applied densely (n² multiply-adds a value).
"""

import sys

import numpy as np
import torch

from analog.storage import rotation


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).double()


def dense_matrix(kind: str, n: int):
    """The (n, n) float32 matrix R of ``kind`` where it replaces analog's transform, else None."""
    if kind == "none":
        return torch.eye(n)
    if kind.startswith("qr:"):
        gen = torch.Generator().manual_seed(int(kind[3:]) * 1000003 + n)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()
    if kind.startswith("h2:") and n & (n - 1) == 0:
        gen = torch.Generator().manual_seed(int(kind[3:]))
        d1, d2 = _signs(n, gen), _signs(n, gen)
        h = rotation._hadamard_block(torch.eye(n, dtype=torch.float64), n.bit_length() - 1)  # H (symmetric)
        return ((h * d2[None, :]) @ (h * d1[None, :])).float()
    return None


def install(kind: str) -> None:
    """Replace Rotation's transform by ``kind``'s in this process (see the module docstring)."""
    if kind == "analog":
        return
    if not (kind == "none" or kind.split(":")[0] in ("h", "h2", "qr")):
        raise SystemExit(f"unknown rotation {kind!r}: use analog, none, h:S, h2:S or qr:S")
    init, forward, inverse = rotation.Rotation.__init__, rotation.Rotation.forward, rotation.Rotation.inverse

    def patched_init(self, n):
        init(self, n)
        self._dense = dense_matrix(kind, self.n)
        if kind.startswith("h:"):
            signs = _signs(self.n, torch.Generator().manual_seed(int(kind[2:]))).float().numpy()
            self._signs = torch.from_numpy(np.ascontiguousarray(signs))
            self._cache = {}

    def patched_forward(self, x):
        return forward(self, x) if self._dense is None else x @ self._dense.to(x.device, x.dtype).T

    def patched_inverse(self, y):
        return inverse(self, y) if self._dense is None else y @ self._dense.to(y.device, y.dtype)

    rotation.Rotation.__init__ = patched_init
    rotation.Rotation.forward = patched_forward
    rotation.Rotation.inverse = patched_inverse


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    install(sys.argv[1])
    sys.argv = [sys.argv[0]] + sys.argv[2:]
    from benchmarks.attribution_lm import run

    run.main()
