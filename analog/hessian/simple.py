"""Identity, diagonal and raw (full-block) curvature over the logged gradients.

* ``none``:      F̂ = I and no damping: scores are plain gradient inner products.
* ``diagonal``:  F̂ = diag((1/N) Σ_n g_n ⊙ g_n);          (F̂ + λI)⁻¹ g = g / (diag + λ).
* ``raw``:       F̂ = (1/N) Σ_n g_n g_nᵀ  (k × k per module, k = logged dimension, so use it on
                 LoGra-compressed logs: rank r per side gives k = r²), eigendecomposed in float64:
                 F̂ = Q diag(e) Qᵀ and (F̂ + λI)⁻¹ g = Q diag(1/(e + λ)) Qᵀ g, computed in float64.
                 State per module: ``evals`` (k,) float64 and ``evecs`` Q (k, k) stored in float32
                 (half the bytes; a project saved with float64 Q is read and used as it is).
                 With fewer examples than dimensions (N < k) F̂ has rank ≤ N, and on the k − N
                 directions no training gradient spans only λ is left: the fit warns, naming them.

``diagonal`` and ``raw`` are fitted by reading the store: a module's sum of per-example terms
(k values for ``diagonal``, k² for ``raw``, float64) is accumulated over the rows, summed over
ranks, divided by N and fitted. Modules are fitted in groups whose sums fit ``fit_bytes`` (one read
of the store per group, see analog.hessian.base.fit_groups): besides the fitted state, a fit holds
at most the budget plus one batch of rows (the group's grads in float64, ``read_bytes`` = 256 MiB at
most unless one row is larger: analog.hessian.base.batch_rows) and one module's eigendecomposition,
whatever the number of modules.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from analog.distributed import all_gather_object
from analog.hessian.base import (
    DEFAULT_FIT_BYTES,
    Curvature,
    damping_value,
    fit_groups,
    reduce_sums,
    share_sums,
)


class Identity(Curvature, kind="none"):
    def _finalize(self, store, progress, fit_bytes=DEFAULT_FIT_BYTES):
        pass

    def precondition(self, name, g, damping=None):
        return g

    def require(self, name, key):  # nothing to require
        return None


class _FromStore(Curvature):
    needs_store = True
    only = None  # a set of module names: fit those alone (analog.hessian.auto); None: every module
    #: bytes of one float64 value of the sums
    SUM_ITEM_BYTES = 8

    def _finalize(self, store, progress, fit_bytes=DEFAULT_FIT_BYTES):
        """Per group of modules (``fit_groups`` over the sums' bytes, in store order, under the smallest
        ``fit_bytes`` of any rank; the modules in ``only`` when set): one read of the store accumulating
        Σ_n term(g_n), a sum over ranks, then ``_fit(name, sum / N)`` per module."""
        if store is None:
            raise RuntimeError(f"hessian {self.kind!r} is fitted from the logged gradients: set save=True")
        shapes = {f["module"]: self._sum_shape(f["module"], f["shape"]) for f in store.fields
                  if f["kind"] == "grad" and (self.only is None or f["module"] in self.only)}
        sizes = {name: self.SUM_ITEM_BYTES * math.prod(shape) for name, shape in shapes.items()}
        # ranks may be given different budgets (e.g. each from its own free memory): all take the smallest,
        # so they form the same groups and their reductions match (otherwise they wait on each other)
        fit_bytes = min(all_gather_object(fit_bytes))
        groups = fit_groups(sizes, fit_bytes, f"hessian {self.kind!r}")
        n = len(store)
        for i, group in enumerate(groups):
            desc = f"fitting {self.kind}" + (f" ({i + 1}/{len(groups)}: {len(group)} modules)" if len(groups) > 1
                                             else "")
            sums = share_sums(store, lambda name, total, g: self._accumulate(total, g), progress, desc, group)
            totals = reduce_sums(sums, store, self._sum_shape, modules=group)
            for name in group:
                self._fit(name, totals.pop(name).div_(n))
        self._check_fitted(n)

    def _check_fitted(self, n: int) -> None:
        """Warnings about what the fit cannot capture (none by default)."""

    def _accumulate(self, total: Optional[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
        """``total`` (None before the first batch) plus Σ over a batch's rows g (B, k) float64 of the
        per-example term, shape ``_sum_shape``; may add into ``total`` in place."""
        raise NotImplementedError

    def _sum_shape(self, name, shape):
        """Shape of the module's sum, from its logged ``shape``."""
        raise NotImplementedError

    def _fit(self, name: str, stat: torch.Tensor) -> None:
        """Fit the module from its normalised statistic (sum / N), which it may consume."""
        raise NotImplementedError


class Diagonal(_FromStore, kind="diagonal"):
    def _accumulate(self, total, g):
        """+ Σ_n g_n ⊙ g_n, (k,)."""
        term = (g * g).sum(0)
        return term if total is None else total.add_(term)

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
    #: dtype the eigenvectors are stored in; preconditioning converts them to float64
    EVECS_DTYPE = torch.float32

    def _accumulate(self, total, g):
        """+ Σ_n g_n g_nᵀ = gᵀ g, (k, k), added in place (no k × k temporary after the first batch)."""
        return g.T @ g if total is None else total.addmm_(g.T, g)

    def _sum_shape(self, name, shape):
        return (math.prod(shape), math.prod(shape))

    def _fit(self, name, stat):
        """F̂ = Q diag(e) Qᵀ by eigh in float64; e clamped at 0 (rounding), Q stored as ``EVECS_DTYPE``."""
        evals, evecs = torch.linalg.eigh(stat)
        self.state[f"{name}/evals"] = evals.clamp_min(0)
        self.state[f"{name}/evecs"] = evecs.to(self.EVECS_DTYPE)

    def _check_fitted(self, n):
        """With N < k examples, F̂ has rank ≤ N: warn, naming each such module with N and k."""
        short = [f"{name!r} (k = {len(self.state[f'{name}/evals'])})" for name in self.modules()
                 if len(self.state[f"{name}/evals"]) > n]
        if short:
            warnings.warn(
                f"hessian 'raw': the project has N = {n} examples, fewer than the logged dimension k of module(s) "
                f"{', '.join(short[:5])}{f' and {len(short) - 5} more' if len(short) > 5 else ''}: their "
                "F̂ = (1/N) Σ g gᵀ has rank at most N, so it holds no curvature on the k − N or more directions "
                "the training gradients do not span, where (F̂ + λI)⁻¹ is 1/λ (the damping alone). Log at "
                "least k examples, or a lower LoGra rank (k = r_out · r_in), to fit those directions",
                stacklevel=4)

    def precondition(self, name, g, damping=None):
        """Q diag(1/(e + λ)) Qᵀ g in float64, for g (B, *shape) with prod(shape) = k."""
        evals, evecs = self.require(name, "evals"), self.require(name, "evecs")
        lam = damping_value(evals, damping)
        flat = g.reshape(g.shape[0], -1).double()
        evecs = evecs.to(flat.device, torch.float64)
        out = ((flat @ evecs) / (evals.to(flat.device, torch.float64) + lam)) @ evecs.T
        return out.reshape(g.shape)
