"""Similarity of representations between two checkpoints: linear CKA, PWCCA, SVCCA.

Inputs are ``X`` (``n x d1``) and ``Y`` (``n x d2``) whose rows are the same ``n`` samples; the
widths may differ. Everything is computed in float64 on column-centred matrices
``Xc = X - 1 mean(X)``.
"""

from __future__ import annotations

import torch

from .base import BaseComparativeMetric, MetricInputError, Setting
from .registry import register_metric

__all__ = ["CKAMetric", "PWCCAMetric", "SVCCAMetric", "cca", "linear_cka", "pwcca", "svcca"]


def _prepare(x: torch.Tensor, y: torch.Tensor, min_samples: int, what: str):
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.dim() == 1:
        x = x[:, None]
    if y.dim() == 1:
        y = y[:, None]
    if x.dim() != 2 or y.dim() != 2:
        raise MetricInputError(f"{what}: expected 2-D (samples, features), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise MetricInputError(
            f"{what}: the two sides have different numbers of samples ({x.shape[0]} vs {y.shape[0]})"
        )
    if x.shape[0] < min_samples:
        raise MetricInputError(f"{what}: needs at least {min_samples} samples, got {x.shape[0]}")
    return x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019), computed in feature space.

    Biased: ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``.

    Debiased: the same ratio with each ``||A^T B||_F^2 = tr(K L)`` (``K = Xc Xc^T``,
    ``L = Yc Yc^T``) replaced by the unbiased HSIC estimator of Song et al. (2012), which for
    centred features reduces to
    ``tr(K L) - n/(n-2) sum_i K_ii L_ii + tr(K) tr(L) / ((n-1)(n-2))`` (up to a factor that
    cancels). Needs ``n >= 4``; its value is near 0 for independent data even when ``d >> n``,
    where biased CKA tends to 1.
    """
    xc, yc = _prepare(x, y, 4 if debiased else 2, "debiased CKA" if debiased else "CKA")
    n = xc.shape[0]

    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        value = (a.T @ b).pow(2).sum()
        if not debiased:
            return value
        ra, rb = (a * a).sum(1), (b * b).sum(1)
        return value - n / (n - 2) * (ra @ rb) + ra.sum() * rb.sum() / ((n - 1) * (n - 2))

    denom = torch.sqrt(similarity(xc, xc) * similarity(yc, yc))
    if denom == 0 or torch.isnan(denom):
        return float("nan")
    return float(similarity(xc, yc) / denom)


def _orthonormal_basis(a: torch.Tensor, rel_tol: float = 1e-10):
    """``U`` (n x r) spanning the column space of ``a``, dropping directions with ``s < rel_tol s_max``."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    keep = s > rel_tol * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep]


def cca(x: torch.Tensor, y: torch.Tensor):
    """Canonical correlations of ``X`` and ``Y``, and the canonical variates of ``X``.

    With orthonormal bases ``Qx`` (n x rx) and ``Qy`` (n x ry) of ``Xc`` and ``Yc``,
    ``Qx^T Qy = U diag(rho) V^T``: ``rho_1 >= ... >= rho_k`` (``k = min(rx, ry)``) are the
    canonical correlations and ``H = Qx U`` (n x k) the unit-norm canonical variates of ``X``.
    Needs ``n > rx + ry`` samples: with fewer, the two subspaces must intersect and spurious
    correlations of 1 appear.
    """
    xc, yc = _prepare(x, y, 3, "CCA")
    qx, qy = _orthonormal_basis(xc), _orthonormal_basis(yc)
    n, rx, ry = xc.shape[0], qx.shape[1], qy.shape[1]
    if rx == 0 or ry == 0:
        raise MetricInputError("CCA: one side is constant (rank 0 after centring)")
    if n <= rx + ry:
        raise MetricInputError(
            f"CCA needs more samples than the two ranks together: n={n}, ranks {rx} + {ry} "
            f"(widths {xc.shape[1]} and {yc.shape[1]}); give at least {rx + ry + 1} samples"
        )
    u, rho, _ = torch.linalg.svd(qx.T @ qy, full_matrices=False)
    k = min(rx, ry)
    return rho[:k].clamp(0.0, 1.0), qx @ u[:, :k], xc


def pwcca(x: torch.Tensor, y: torch.Tensor) -> float:
    """Projection-weighted CCA (Morcos et al. 2018): ``sum_i a_i rho_i / sum_i a_i``.

    ``a_i = sum_j |<h_i, xc_j>|`` weighs canonical correlation ``rho_i`` by how much the ``i``-th
    canonical variate ``h_i`` of ``X`` accounts for the centred neurons ``xc_j`` of ``X`` (the
    first argument, i.e. the checkpoint being measured). Equal to 1 for ``Y = X A + b`` with
    ``A`` invertible; unchanged by invertible affine maps of ``Y``; ``|rho|`` in 1-D.
    """
    rho, h, xc = cca(x, y)
    weights = (h.T @ xc).abs().sum(1)
    return float((weights * rho).sum() / weights.sum())


def svcca(x: torch.Tensor, y: torch.Tensor, variance_fraction: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation after reducing each side by SVD.

    Each centred side keeps its top singular directions explaining ``variance_fraction`` of its
    variance (``sum_{i<=k} s_i^2 / sum_i s_i^2 >= variance_fraction``); the result is
    ``(1/k) sum_i rho_i`` over the ``k = min(kx, ky)`` canonical correlations of the reduced sides.
    """
    xc, yc = _prepare(x, y, 3, "SVCCA")
    return float(cca(_reduce(xc, variance_fraction), _reduce(yc, variance_fraction))[0].mean())


def _reduce(a: torch.Tensor, fraction: float) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int(torch.searchsorted(energy, torch.tensor(fraction, dtype=energy.dtype)).item()) + 1
    k = min(k, s.numel())
    return u[:, :k] * s[:k]


@register_metric("cka")
class CKAMetric(BaseComparativeMetric):
    """Linear CKA against the target checkpoint; ``debiased: true`` for the unbiased-HSIC form."""

    settings = {"debiased": Setting(bool, False, "use the debiased estimator")}

    def compare(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return linear_cka(x, y, debiased=self.config["debiased"])


@register_metric("pwcca")
class PWCCAMetric(BaseComparativeMetric):
    """Projection-weighted CCA against the target checkpoint (weights from the current checkpoint)."""

    def compare(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return pwcca(x, y)


@register_metric("svcca")
class SVCCAMetric(BaseComparativeMetric):
    """SVCCA against the target checkpoint, keeping ``variance_fraction`` of each side's variance."""

    settings = {
        "variance_fraction": Setting(float, 0.99, "in (0, 1]", check=lambda v: 0 < v <= 1),
    }

    def compare(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return svcca(x, y, self.config["variance_fraction"])
