"""Metrics of the singular values of one matrix.

All of them read ``LayerData.singular_values``: ``s_1 >= ... >= s_r`` with ``r = min(m, n)`` of
the float64 matrix view ``W`` (``m x n``), computed once per layer and shared. Eigenvalues of
``W^T W`` are ``lambda_i = s_i^2``.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import BaseMetric, LayerData, Setting
from .registry import register_metric

__all__ = [
    "ConditionNumberMetric",
    "EffectiveRankMetric",
    "IsotropyMetric",
    "PERMetric",
    "PowerLawAlphaMetric",
    "StableRankMetric",
    "effective_rank",
    "fit_power_law",
]


def effective_rank(s: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): ``exp(-sum_i p_i ln p_i)`` with ``p_i = s_i / sum_j s_j``
    (terms with ``p_i = 0`` are 0). The identity of size n gives n; a rank-1 matrix gives 1."""
    total = s.sum()
    if total == 0:
        return float("nan")
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


class _SpectralMetric(BaseMetric):
    """Whole-model value: the metric of the union of all matrices' singular values (block-diagonal spectrum)."""

    needs_matrix = True
    whole_model = "pooled"


@register_metric("condition_number")
class ConditionNumberMetric(_SpectralMetric):
    """Condition number ``kappa = s_max / s_min`` over the ``r = min(m, n)`` singular values (inf if s_min = 0)."""

    def compute(self, layer: LayerData) -> float:
        s = layer.singular_values
        return float("inf") if s[-1] == 0 else float(s[0] / s[-1])


@register_metric("effective_rank")
class EffectiveRankMetric(_SpectralMetric):
    """Effective rank ``exp(H(p))``, ``H(p) = -sum_i p_i ln p_i``, ``p_i = s_i / sum_j s_j``."""

    def compute(self, layer: LayerData) -> float:
        return effective_rank(layer.singular_values)


@register_metric("per")
class PERMetric(_SpectralMetric):
    """Proportional effective rank (Diehl Martinez et al. 2024): ``PER = exp(H(p)) / r``, in (0, 1].

    ``p_i = s_i / sum_j s_j`` and ``H`` uses the natural log, as the code of pico-analyze does
    (its docstring's log2 entropy was not what it computed).
    """

    def compute(self, layer: LayerData) -> float:
        s = layer.singular_values
        return effective_rank(s) / s.numel()


@register_metric("stable_rank")
class StableRankMetric(_SpectralMetric):
    """Stable rank ``||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2``: n for an n x n orthogonal matrix, 1 for rank 1."""

    def compute(self, layer: LayerData) -> float:
        s = layer.singular_values
        return float("nan") if s[0] == 0 else float((s**2).sum() / s[0] ** 2)


@register_metric("isotropy")
class IsotropyMetric(_SpectralMetric):
    """Normalised isotropy ``(sum_i lambda_i)^2 / (r * sum_i lambda_i^2)`` with ``lambda_i = s_i^2``.

    Equals ``tr(W W^T)^2 / (r ||W W^T||_F^2)``: 1 when all singular values are equal (isotropic),
    ``1/r`` for rank 1. (Phase-Viz's unnormalised form is the ``participation_ratio`` with
    ``over: spectrum``.)
    """

    def compute(self, layer: LayerData) -> float:
        lam = layer.singular_values**2
        denom = lam.numel() * (lam**2).sum()
        return float("nan") if denom == 0 else float(lam.sum() ** 2 / denom)


def fit_power_law(samples, xmin=None, min_tail: int = 10):
    """Continuous power-law fit ``p(x) ~ x^(-alpha)`` for ``x >= xmin`` (Clauset, Shalizi & Newman 2009).

    MLE: ``alpha = 1 + n_tail / sum_{x_i >= xmin} ln(x_i / xmin)``. With ``xmin=None`` every
    candidate ``xmin`` (sample value leaving at least ``min_tail`` points in the tail) is tried and
    the one minimising the Kolmogorov-Smirnov distance
    ``D = max |S(x) - (1 - (x / xmin)^(1 - alpha))|`` between the empirical tail CDF ``S`` and the
    fitted one is kept. Returns ``(alpha, xmin, D)``; NaNs when fewer than ``min_tail`` positive samples.
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    x = x[x > 0]
    nan = (float("nan"), float("nan"), float("nan"))
    if x.size < min_tail:
        return nan
    if xmin is not None:
        tail = x[x >= xmin]
        if tail.size < min_tail:
            return nan
        return _fit_tail(tail, float(xmin))
    candidates = np.unique(x[: x.size - min_tail + 1])
    best = nan
    for candidate in candidates:
        fit = _fit_tail(x[x >= candidate], float(candidate))
        if np.isnan(best[2]) or fit[2] < best[2]:
            best = fit
    return best


def _fit_tail(tail: np.ndarray, xmin: float):
    logs = np.log(tail / xmin).sum()
    if logs <= 0:
        return float("nan"), xmin, float("inf")
    alpha = 1.0 + tail.size / logs
    empirical = np.arange(1, tail.size + 1) / tail.size
    fitted = 1.0 - (tail / xmin) ** (1.0 - alpha)
    distance = float(np.max(np.abs(empirical - fitted)))
    return float(alpha), xmin, distance


@register_metric("power_law_alpha")
class PowerLawAlphaMetric(_SpectralMetric):
    """Heavy-tail exponent ``alpha`` of the eigenvalue spectrum ``lambda_i = s_i^2`` of ``W^T W``.

    Fitted by :func:`fit_power_law` (continuous MLE, ``xmin`` by minimum KS distance unless given).
    NaN when the matrix has fewer than ``min_tail`` non-zero eigenvalues.
    """

    settings = {
        "xmin": Setting(float, None, "fixed lower bound of the tail (default: chosen by KS)"),
        "min_tail": Setting(int, 10, "smallest tail size, >= 3", check=lambda v: v >= 3),
    }

    def compute(self, layer: LayerData) -> float:
        lam = (layer.singular_values**2).numpy()
        return fit_power_law(lam, self.config["xmin"], self.config["min_tail"])[0]
