"""Metrics of the entries of one tensor (any shape): norms, sparsity, distribution statistics.

Every metric reads ``LayerData.flat`` (float64, ``N`` entries ``w_1..w_N``) so bf16/fp16
checkpoints are measured in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import CHUNK, BaseMetric, LayerData, Setting
from .registry import register_metric

__all__ = [
    "EntropyMetric",
    "GiniMetric",
    "HoyerMetric",
    "KurtosisMetric",
    "MeanMetric",
    "NormMetric",
    "ParticipationRatioMetric",
    "SkewnessMetric",
    "SparsityMetric",
    "VarianceMetric",
    "gini",
    "hoyer",
]

NORM_TYPES = ("frobenius", "nuclear", "spectral", "max", "inf")


@register_metric("norm")
class NormMetric(BaseMetric):
    """A matrix or entry norm, chosen by ``norm_type``.

    * ``frobenius``: ``||W||_F = sqrt(sum_ij w_ij^2)``
    * ``nuclear``:   ``||W||_* = sum_i s_i`` (singular values of the matrix view)
    * ``spectral``:  ``||W||_2 = s_max``
    * ``max``:       ``max_ij |w_ij|``
    * ``inf``:       the same as ``max``: pico-analyze's ``torch.norm(W, p=inf)`` flattens ``W``, so it is
      the largest entry magnitude, not the induced matrix norm ``max_i sum_j |w_ij|``

    ``nuclear`` and ``spectral`` need a matrix and reuse the layer's single SVD.
    """

    whole_model = "pooled"

    settings = {"norm_type": Setting(str, "frobenius", "which norm", choices=NORM_TYPES)}

    def __init__(self, **settings):
        super().__init__(**settings)
        self.config["norm_type"] = self.config["norm_type"].lower()
        self.needs_matrix = self.config["norm_type"] in ("nuclear", "spectral")

    def compute(self, layer: LayerData) -> float:
        kind = self.config["norm_type"]
        if kind == "frobenius":
            return float(torch.linalg.vector_norm(layer.flat))
        if kind in ("max", "inf"):
            return float(torch.linalg.vector_norm(layer.flat, float("inf")))
        s = layer.singular_values
        return float(s.sum() if kind == "nuclear" else s[0])


def gini(values: torch.Tensor) -> float:
    """Gini index of ``|values|`` (Hurley & Rickard 2009).

    With ``c_(1) <= ... <= c_(N)`` the sorted magnitudes,
    ``G = 1 - 2 * sum_k (c_(k) / ||c||_1) * (N - k + 1/2) / N``.
    A constant vector gives 0; a one-hot vector gives ``1 - 1/N``. All zeros: NaN.
    Computed as ``1 - 2 ((N + 1/2) ||c||_1 - sum_k k c_(k)) / (N ||c||_1)`` with one sorted copy (sorted in
    place) and ``sum_k k c_(k)`` accumulated in chunks, so a pooled whole model costs one extra copy.
    """
    c = values.detach().to(torch.float64).abs().cpu().numpy()  # abs() made a new array: safe to sort in place
    c.sort()
    n = c.size
    total = float(c.sum())
    if total == 0:
        return float("nan")
    weighted = 0.0
    for start in range(0, n, CHUNK):
        block = c[start : start + CHUNK]
        weighted += float(np.dot(block, np.arange(start + 1, start + 1 + block.size, dtype=np.float64)))
    return float(1 - 2 * ((n + 0.5) * total - weighted) / (n * total))


def hoyer(values: torch.Tensor) -> float:
    """Hoyer sparsity ``(sqrt(N) - ||w||_1 / ||w||_2) / (sqrt(N) - 1)``: 0 for a constant, 1 for one-hot."""
    n = values.numel()
    l2 = torch.linalg.vector_norm(values)
    if n < 2 or l2 == 0:
        return float("nan")
    root = math.sqrt(n)
    return float((root - values.abs().sum() / l2) / (root - 1))


@register_metric("gini")
class GiniMetric(BaseMetric):
    """Gini index of the entry magnitudes: ``G = 1 - 2 sum_k (c_(k)/||c||_1) (N - k + 1/2)/N``."""

    whole_model = "pooled"

    def compute(self, layer: LayerData) -> float:
        return gini(layer.flat)


@register_metric("hoyer")
class HoyerMetric(BaseMetric):
    """Hoyer sparsity ``(sqrt(N) - ||w||_1/||w||_2) / (sqrt(N) - 1)`` in [0, 1]."""

    whole_model = "pooled"

    def compute(self, layer: LayerData) -> float:
        return hoyer(layer.flat)


@register_metric("sparsity")
class SparsityMetric(BaseMetric):
    """Fraction of entries below a threshold: ``|{i : |w_i| < threshold}| / N``."""

    whole_model = "pooled"

    settings = {"threshold": Setting(float, 1e-3, "threshold >= 0", check=lambda v: v >= 0)}

    def compute(self, layer: LayerData) -> float:
        threshold = self.config["threshold"]
        below = sum(int(torch.count_nonzero(chunk.abs() < threshold)) for chunk in layer.flat.split(CHUNK))
        return below / layer.flat.numel()


@register_metric("entropy")
class EntropyMetric(BaseMetric):
    """Shannon entropy (nats) of the entry histogram: ``H = -sum_b p_b ln p_b``.

    ``p_b`` is the fraction of entries in bin ``b`` of ``bins`` equal-width bins over
    ``[min w, max w]`` (empty bins contribute 0). A constant tensor gives 0; the maximum is
    ``ln(bins)``.
    """

    whole_model = "pooled"

    settings = {"bins": Setting(int, 100, "bins >= 2", check=lambda v: v >= 2)}

    def compute(self, layer: LayerData) -> float:
        w = layer.flat
        lo, hi = float(w.min()), float(w.max())
        if lo == hi:
            return 0.0
        counts = torch.histc(w, bins=self.config["bins"], min=lo, max=hi)
        p = counts[counts > 0] / w.numel()
        return float(-(p * p.log()).sum())


@register_metric("mean")
class MeanMetric(BaseMetric):
    """Mean of the entries ``mu = (1/N) sum_i w_i``."""

    whole_model = "pooled"

    def compute(self, layer: LayerData) -> float:
        return layer.central_moments[0]


@register_metric("variance")
class VarianceMetric(BaseMetric):
    """Population variance ``(1/N) sum_i (w_i - mu)^2`` (divides by N, not N-1)."""

    whole_model = "pooled"

    def compute(self, layer: LayerData) -> float:
        return layer.central_moments[1]


@register_metric("skewness")
class SkewnessMetric(BaseMetric):
    """Population skewness ``g1 = m3 / m2^(3/2)`` with ``m_k = (1/N) sum_i (w_i - mu)^k``; NaN when m2 = 0."""

    whole_model = "pooled"

    def compute(self, layer: LayerData) -> float:
        _, m2, m3, _ = layer.central_moments
        return float("nan") if m2 == 0 else m3 / m2**1.5


@register_metric("kurtosis")
class KurtosisMetric(BaseMetric):
    """Kurtosis from population moments: excess (Fisher) ``m4 / m2^2 - 3`` by default, so a
    Gaussian gives 0; with ``excess: false`` the Pearson kurtosis ``m4 / m2^2`` (Gaussian: 3)."""

    whole_model = "pooled"

    settings = {"excess": Setting(bool, True, "subtract 3 (Fisher) or not (Pearson)")}

    def compute(self, layer: LayerData) -> float:
        _, m2, _, m4 = layer.central_moments
        if m2 == 0:
            return float("nan")
        value = m4 / m2**2
        return value - 3.0 if self.config["excess"] else value


@register_metric("participation_ratio")
class ParticipationRatioMetric(BaseMetric):
    """Participation ratio ``PR = (sum_i x_i)^2 / sum_i x_i^2``.

    ``over: elements`` (default, as Phase-Viz): ``x_i = w_i^2``, i.e. ``(sum w^2)^2 / sum w^4``,
    between 1 (one non-zero entry) and N. ``over: spectrum``: ``x_i = s_i^2`` (eigenvalues of
    ``W^T W``), between 1 and ``min(m, n)``; needs a matrix and reuses the layer's SVD.
    """

    whole_model = "pooled"

    settings = {"over": Setting(str, "elements", "what participates", choices=("elements", "spectrum"))}

    def __init__(self, **settings):
        super().__init__(**settings)
        self.needs_matrix = self.config["over"] == "spectrum"

    def compute(self, layer: LayerData) -> float:
        values = layer.singular_values if self.needs_matrix else layer.flat
        s2, s4 = 0.0, 0.0
        for chunk in values.split(CHUNK):
            x = chunk * chunk
            s2, s4 = s2 + float(x.sum()), s4 + float((x * x).sum())
        return float("nan") if s4 == 0 else s2 * s2 / s4
