"""Identity, diagonal and raw (full-block) curvature over the logged gradients.

* ``none``:      F̂ = I and no damping: scores are plain gradient inner products.
* ``diagonal``:  F̂ = diag((1/N) Σ_n g_n ⊙ g_n);          (F̂ + λI)⁻¹ g = g / (diag + λ).
* ``raw``:       F̂ = (1/N) Σ_n g_n g_nᵀ  (D × D per module, D = logged dimension, so use it on
                 LoGra-compressed logs), eigendecomposed in float64: F̂ = Q diag(e) Qᵀ and
                 (F̂ + λI)⁻¹ g = Q diag(1/(e + λ)) Qᵀ g.
"""

from __future__ import annotations

import math

import torch

from analog.hessian.base import Curvature, damping_value, reduce_sums, share_sums


class Identity(Curvature, kind="none"):
    def _finalize(self, store, progress):
        pass

    def precondition(self, name, g, damping=None):
        return g

    def require(self, name, key):  # nothing to require
        return None


class _FromStore(Curvature):
    needs_store = True
    only = None  # a set of module names: fit those alone (analog.hessian.auto); None: every module

    def _finalize(self, store, progress):
        if store is None:
            raise RuntimeError(f"hessian {self.kind!r} is fitted from the logged gradients: set save=True")
        sums = share_sums(store, lambda name, g: self._term(g), progress, f"fitting {self.kind}", self.only)
        n = len(store)
        for name, total in reduce_sums(sums, store, self._sum_shape, self.only).items():
            self._fit(name, total / n)

    def _term(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sum_shape(self, name, shape):
        raise NotImplementedError

    def _fit(self, name: str, stat: torch.Tensor) -> None:
        raise NotImplementedError


class Diagonal(_FromStore, kind="diagonal"):
    def _term(self, g):
        return (g * g).sum(0)

    def _sum_shape(self, name, shape):
        return (math.prod(shape),)

    def _fit(self, name, stat):
        self.state[f"{name}/diag"] = stat

    def precondition(self, name, g, damping=None):
        diag = self.require(name, "diag")
        lam = damping_value(diag, damping)
        flat = g.reshape(g.shape[0], -1).double()
        return (flat / (diag.to(flat.device) + lam)).reshape(g.shape)


class Raw(_FromStore, kind="raw"):
    def _term(self, g):
        return g.T @ g

    def _sum_shape(self, name, shape):
        return (math.prod(shape), math.prod(shape))

    def _fit(self, name, stat):
        evals, evecs = torch.linalg.eigh(stat)
        self.state[f"{name}/evals"] = evals.clamp_min(0)
        self.state[f"{name}/evecs"] = evecs

    def precondition(self, name, g, damping=None):
        evals, evecs = self.require(name, "evals"), self.require(name, "evecs")
        lam = damping_value(evals, damping)
        flat = g.reshape(g.shape[0], -1).double()
        evecs = evecs.to(flat.device)
        out = ((flat @ evecs) / (evals.to(flat.device) + lam)) @ evecs.T
        return out.reshape(g.shape)
