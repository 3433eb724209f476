"""Phase-Viz's layer-set metrics: a value per weight matrix and a whole-model value that combines them.

All of them are defined on matrices (``needs_matrix``: with no ``layer_suffixes`` every tensor with
2 or more dims; Phase-Viz takes the weights of ``Linear``/``Conv`` modules, which a state dict does
not tell apart from embeddings, so select layers with ``layer_suffixes`` to exclude those). Notation
as in :mod:`analog.metrics.spectral`: ``W_l`` is ``m_l x n_l`` (conv kernels flattened to
``out x in*kh*kw``), ``s_1 >= ... >= s_r`` its singular values, ``r_l = min(m_l, n_l)``, ``L`` the number
of matrices. Formulas are those of Phase-Viz's README (seed 001); where the README is ambiguous the
choice is stated in the class docstring.
"""

from __future__ import annotations

import math
from typing import List

import torch

from .base import BaseMetric, LayerData, PooledData, Setting
from .registry import register_metric

__all__ = [
    "CapacityMetric",
    "ConnectivityMetric",
    "FlatnessMetric",
    "GradientFlowMetric",
    "MaxActivationMetric",
    "NormRatioMetric",
]


class _MatrixMetric(BaseMetric):
    needs_matrix = True


@register_metric("connectivity")
class ConnectivityMetric(_MatrixMetric):
    """Layer connectivity: per layer ``mean_ij |w_ij|``; whole model ``C = (1/L) sum_l mean(|W_l|)``."""

    whole_model = "mean"

    def compute(self, layer: LayerData) -> float:
        return float(layer.flat.abs().mean())


@register_metric("norm_ratio")
class NormRatioMetric(_MatrixMetric):
    """Norm ratio of the last to the first weight matrix: ``R = ||W_last|| / ||W_first||`` (whole model only).

    "First" and "last" follow the checkpoint's tensor order (the state-dict order of a ``.pt``
    file, i.e. module registration order; ``.safetensors`` files list names sorted, so pick the two
    layers with ``layer_suffixes`` there). The README writes ``||.||_2``; Phase-Viz's code takes
    ``weight.norm(2)``, the 2-norm of the flattened matrix, i.e. Frobenius, which is the default
    here; ``norm_type: spectral`` gives ``s_1``. ``0/0`` is NaN, ``x/0`` is inf; one matrix gives 1.
    """

    per_layer = False
    whole_model = "custom"
    settings = {"norm_type": Setting(str, "frobenius", "norm of each matrix", choices=("frobenius", "spectral"))}

    def compute(self, layer: LayerData) -> float:
        if self.config["norm_type"] == "spectral":
            return float(layer.singular_values[0])
        return float(torch.linalg.vector_norm(layer.flat))

    def compute_whole(self, pooled: PooledData, values: List[float]) -> float:
        first, last = values[0], values[-1]
        if first == 0:
            return float("nan") if last == 0 else float("inf")
        return last / first


@register_metric("capacity")
class CapacityMetric(_MatrixMetric):
    """Activation capacity: per layer ``ln(d_out + 1)`` with ``d_out = m_l`` (rows, ``nn.Linear``'s
    ``out_features``); whole model ``C = sum_l ln(d_out,l + 1)``.

    The README's ``d_out`` is used for every matrix; Phase-Viz's code multiplied a conv layer's
    ``out_channels`` by one kernel side, which the README does not state.
    """

    whole_model = "sum"

    def compute(self, layer: LayerData) -> float:
        return math.log(layer.tensor.shape[0] + 1)


@register_metric("gradient_flow")
class GradientFlowMetric(_MatrixMetric):
    """Gradient flow score: per layer ``1 / (1 + |sigma_l - sigma_expected|)``; whole model the mean
    ``GFS = (1/L) sum_l ...``.

    ``sigma_l`` is the sample standard deviation of the entries (``N - 1`` denominator, as
    Phase-Viz's ``tensor.std()``). ``sigma_expected``: ``init: he`` (default, Phase-Viz's code)
    ``sqrt(2 / fan_in)``; ``init: xavier`` ``sqrt(2 / (fan_in + fan_out))``, with ``fan_in = n_l``
    (``in * kh * kw`` for a conv kernel, as ``torch.nn.init`` counts it) and ``fan_out = m_l``.
    """

    whole_model = "mean"
    settings = {"init": Setting(str, "he", "expected-scale rule", choices=("he", "xavier"))}

    def compute(self, layer: LayerData) -> float:
        m, n = layer.matrix.shape
        expected = math.sqrt(2.0 / n) if self.config["init"] == "he" else math.sqrt(2.0 / (n + m))
        std = float(layer.flat.std()) if layer.flat.numel() > 1 else 0.0
        return 1.0 / (1.0 + abs(std - expected))


@register_metric("flatness")
class FlatnessMetric(_MatrixMetric):
    """Flatness proxy ``F = ||W||_F * ||W||_2 = sqrt(sum_ij w_ij^2) * s_1``.

    Whole model: the same on all matrices at once, ``sqrt(sum_l ||W_l||_F^2) * max_l s_1(W_l)``
    (Frobenius norm of all weights times the largest singular value, as Phase-Viz's code combines its
    whole-model weight norm and spectral norm; biases are not matrices and are left out).
    """

    whole_model = "pooled"

    def compute(self, layer: LayerData) -> float:
        return float(torch.linalg.vector_norm(layer.flat) * layer.singular_values[0])


@register_metric("max_activation")
class MaxActivationMetric(_MatrixMetric):
    """Max-activation capacity, per layer ``ln(m_l n_l) * exp(-sum_i p_i ln(p_i + 1e-10)) / r_l``.

    ``p_i = s_i / sum_j s_j`` (normalised singular values, the README's ``p_i^{(l)}``), so the second
    factor is the proportional effective rank with the README's ``1e-10`` inside the log. Whole
    model: the README's ``(1/L) sum_l`` of the per-layer values. (Phase-Viz's code instead returned
    the largest ``|w_ij|``, which is ``norm`` with ``norm_type: max``.) An all-zero matrix gives NaN.
    """

    whole_model = "mean"

    def compute(self, layer: LayerData) -> float:
        s = layer.singular_values
        total = s.sum()
        if total == 0:
            return float("nan")
        p = s / total
        m, n = layer.matrix.shape
        return float(math.log(m * n) * torch.exp(-(p * torch.log(p + 1e-10)).sum()) / s.numel())
