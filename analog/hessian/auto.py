"""``hessian: "auto"`` (= ``True``): per module, the curvature the benchmarks found best for what was logged.

For each module with k logged numbers per example (LoGra: G · r_out · r_in) and a store of N examples:

* ``raw`` where N ≥ k: F̂ = (1/N) Σ_n g_n g_nᵀ (k × k) is then determined by the logged gradients, and
  on compressed logs it is the best linear use of what was kept: with H = F̂ the score
  (Pq)ᵀ(P F̂ Pᵀ + λI)⁻¹(Pg) is the estimate of the full-space one given the sketch
  (benchmarks/results/sketch_probe.md);
* K-FAC elsewhere (N < k: F̂ would be rank-deficient, its inverse the damping's on every direction
  the N examples do not span) and without a store (``save=False``): F ≈ S ⊗ A from the factors the
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
from typing import Dict

from analog.hessian.base import DEFAULT_FIT_BYTES
from analog.hessian.kfac import KFAC
from analog.hessian.simple import Raw


class Auto(KFAC, kind="auto"):
    """K-FAC factors from the logging pass for every module; ``raw`` fitted from the store for the
    modules whose logged dimension k is at most the store's N."""

    def _finalize(self, store, progress, fit_bytes=DEFAULT_FIT_BYTES):
        super()._finalize(store, progress, fit_bytes)
        if store is None:
            return
        n = len(store)
        chosen = {f["module"] for f in store.fields
                  if f["kind"] == "grad" and math.prod(f["shape"]) <= n}
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
