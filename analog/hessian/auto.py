"""``hessian: "auto"`` (= ``True``): per module, the curvature the benchmarks found best for what was logged.

For each module with k logged numbers per example (LoGra: G · r_out · r_in) and a store of N examples:

* ``raw`` where N ≥ k and its k × k float64 sums fit ``fit_bytes`` (8k² bytes; default 1 GiB, so
  k ≤ 11,585): F̂ = (1/N) Σ_n g_n g_nᵀ (k × k) is then determined by the logged gradients, and
  on compressed logs it is the best linear use of what was kept: with H = F̂ the score
  (Pq)ᵀ(P F̂ Pᵀ + λI)⁻¹(Pg) is the estimate of the full-space one given the sketch
  (benchmarks/results/sketch_probe.md);
* K-FAC elsewhere (N < k: F̂ would be rank-deficient, its inverse the damping's on every direction
  the N examples do not span; 8k² > ``fit_bytes``: the sums and the O(k³) fit of an uncompressed wide
  layer — a warning names those modules) and without a store (``save=False``): F ≈ S ⊗ A from the factors the
  hooks collect while logging (analog.hessian.kfac), so K-FAC factors are always collected.

Measured (× uncompressed EK-FAC of the same run, benchmarks/results/attribution_lm.md): raw beat K-FAC
on compressed logs where N ≥ k — benchmark LM (H100) LoGra r64, N = 8,192 ≥ k = 4,096: recall@2 0.357
vs 0.269, LDS 0.051 vs 0.034; CPU LM r16 (k = 256, N = 1,024): 0.536 vs 0.456 / 0.208 vs 0.183;
digits r16 (k ≤ 256, N = 1,000): LDS 0.478 vs 0.448 — and lost where N < k on digits (r64: fc1 logs
2,048 numbers for 1,000 examples; LDS 0.507 vs K-FAC 0.625). The rule is per module, so a project
mixes both: each module's block of the score, g_qᵀ (F̂_m + λ_m I)⁻¹ g_m, is summed as for any kind.
``choices()`` says which module got which.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict

from analog.distributed import all_gather_object
from analog.hessian.base import DEFAULT_FIT_BYTES, format_bytes
from analog.hessian.kfac import KFAC
from analog.hessian.simple import Raw


class Auto(KFAC, kind="auto"):
    """K-FAC factors from the logging pass for every module; ``raw`` fitted from the store for the
    modules whose logged dimension k is at most the store's N and whose 8k² bytes of sums fit ``fit_bytes``."""

    def _finalize(self, store, progress, fit_bytes=DEFAULT_FIT_BYTES):
        super()._finalize(store, progress, fit_bytes)
        if store is None:
            return
        n = len(store)
        fit_bytes = min(all_gather_object(fit_bytes))  # the budget Raw fits under: the same on every rank
        dims = {f["module"]: math.prod(f["shape"]) for f in store.fields if f["kind"] == "grad"}
        chosen = {name for name, k in dims.items() if k <= n and Raw.SUM_ITEM_BYTES * k * k <= fit_bytes}
        too_big = [name for name, k in dims.items() if k <= n and name not in chosen]
        if too_big:
            warnings.warn(f"hessian 'auto': module(s) {', '.join(repr(m) for m in too_big[:5])}"
                          f"{f' and {len(too_big) - 5} more' if len(too_big) > 5 else ''} keep K-FAC although "
                          f"the store has enough examples for 'raw': its k × k sums would exceed fit_bytes = "
                          f"{format_bytes(fit_bytes)} (raise fit_bytes, or hessian: raw, to fit them anyway)",
                          stacklevel=3)
        if not chosen:
            return
        raw = Raw()
        raw.only = chosen
        raw._finalize(store, progress, fit_bytes)
        for name in chosen:  # the module's K-FAC factors are not used: drop them
            for key in ("A", "S", "QA", "QS", "eA", "eS"):
                self.state.pop(f"{name}/{key}", None)
        self.state.update(raw.state)

    def choices(self) -> Dict[str, str]:
        """{module: "raw" | "kfac"}: what each module's block was fitted with."""
        return {name: "raw" if f"{name}/evecs" in self.state else "kfac" for name in self.modules()}

    def precondition(self, name, g, damping=None):
        if f"{name}/evecs" in self.state:
            return Raw.precondition(self, name, g, damping)
        return super().precondition(name, g, damping)
