"""Metric interfaces and the per-layer data object that shares one SVD between spectral metrics.

Three kinds of metric, each a small class with an exact interface:

* :class:`BaseMetric` -- ``compute(layer: LayerData) -> float`` on one tensor of one checkpoint;
  ``needs_matrix = True`` marks metrics defined on a matrix (singular values, rows/columns).
* :class:`BaseComparativeMetric` -- ``compare(x, y) -> float`` between two ``(n, d)`` matrices whose
  rows are paired samples (the current checkpoint and a target checkpoint; widths may differ).
* :class:`BaseModelMetric` -- ``compute_model(model) -> float`` on a model built from a checkpoint.

Settings are declared as :class:`Setting` and validated when the metric is built, so a bad value
is an error naming the setting before any checkpoint is read.

Whole-model values (one number per checkpoint over every selected tensor at once, as Phase-Viz
reports them): a tensor metric declares ``whole_model``:

* ``"pooled"`` -- ``compute`` on :class:`PooledData`, whose ``flat`` is the concatenation of all
  selected tensors' entries and whose ``singular_values`` are the union of every matrix's
  singular values (the spectrum of the block-diagonal matrix ``diag(W_1, ..., W_L)``);
* ``"mean"`` / ``"sum"`` -- the mean / sum of the per-layer values (metrics the seed defines that way);
* ``None`` -- no whole-model value. Other rules override :meth:`BaseMetric.compute_whole`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "BaseComparativeMetric",
    "BaseMetric",
    "BaseModelMetric",
    "LayerData",
    "LowRankProduct",
    "MetricInputError",
    "PooledData",
    "Setting",
    "as_samples",
]


#: entries per chunk when a statistic is accumulated over a long vector (bounds temporaries to ~8 MiB)
CHUNK = 1 << 20


class MetricInputError(ValueError):
    """A metric given data it is not defined on (a 1-D tensor for a matrix metric, too few samples)."""


@dataclass(frozen=True)
class Setting:
    """One metric setting: its type, default, an optional check and a one-line description."""

    kind: type
    default: Any
    doc: str = ""
    check: Optional[Callable[[Any], bool]] = None
    choices: Optional[Tuple[Any, ...]] = None

    def parse(self, value: Any, where: str) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {self.kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{where}: invalid value {value!r} ({self.doc})")
        return value


class _SettingsMixin:
    name: ClassVar[str] = "?"
    settings: ClassVar[Dict[str, Setting]] = {}

    def __init__(self, **settings: Any):
        unknown = sorted(set(settings) - set(self.settings))
        if unknown:
            allowed = ", ".join(sorted(self.settings)) or "none"
            raise ValueError(f"metric '{self.name}': unknown setting(s) {', '.join(unknown)}; allowed: {allowed}")
        self.config = {
            key: spec.parse(settings[key], f"metric '{self.name}' setting '{key}'") if key in settings else spec.default
            for key, spec in self.settings.items()
        }

    def describe(self) -> Dict[str, Any]:
        return {"metric_name": self.name, **self.config}


@dataclass(frozen=True)
class LowRankProduct:
    """A matrix given as ``left @ right`` with a thin inner dimension ``k`` (``left``: ``m x k``,
    ``right``: ``k x n``), such as an attention head's OV circuit ``W_O[:, h] W_V[h]``.

    Its rank is at most ``k``; :class:`LayerData` computes its spectrum on the compact form (see
    :meth:`compact_singular_values`) instead of on the ``m x n`` product, whose ``min(m, n) - k``
    structurally zero singular values come out of an SVD as rounding noise (~1e-16 s_max).
    """

    left: torch.Tensor
    right: torch.Tensor

    def product(self) -> torch.Tensor:
        return self.left @ self.right

    def compact_singular_values(self) -> torch.Tensor:
        """The ``min(k, m, n)`` leading singular values of ``left @ right``, descending.

        With reduced QR ``left = Q_L R_L`` and ``right^T = Q_R R_R`` (``Q`` with orthonormal
        columns), ``left @ right = Q_L (R_L R_R^T) Q_R^T``, so its non-trivial singular values are
        those of the ``k x k`` core ``R_L R_R^T``; the other ``min(m, n) - k`` are exactly zero.
        When ``k >= min(m, n)`` there is nothing to drop and the product is decomposed directly.
        """
        m, k = self.left.shape
        n = self.right.shape[1]
        if k >= min(m, n):
            return torch.linalg.svdvals(self.product())
        r_left = torch.linalg.qr(self.left, mode="r").R
        r_right = torch.linalg.qr(self.right.T, mode="r").R
        return torch.linalg.svdvals(r_left @ r_right.T)


class LayerData:
    """One layer's tensor with lazily computed views, each computed at most once.

    ``flat``: float64 vector of all entries. ``matrix``: float64 ``(shape[0], prod(shape[1:]))``
    (a conv kernel ``(out, in, kh, kw)`` becomes ``(out, in*kh*kw)``). ``singular_values``:
    ``svdvals(matrix)`` in descending order, computed once and shared by every spectral metric
    (``svd_calls`` counts the decompositions). A :class:`LowRankProduct` is materialised for
    ``tensor``/``flat``/``matrix`` but its ``singular_values`` are the compact spectrum.
    """

    def __init__(self, name: str, tensor: Union[torch.Tensor, LowRankProduct], step: Optional[int] = None):
        self.name = name
        self.factors = tensor if isinstance(tensor, LowRankProduct) else None
        self.tensor = tensor.product() if self.factors is not None else tensor
        self.step = step
        self.svd_calls = 0

    @property
    def where(self) -> str:
        return f"layer '{self.name}'" + (f" at step {self.step}" if self.step is not None else "")

    @cached_property
    def flat(self) -> torch.Tensor:
        if self.tensor.numel() == 0:
            raise MetricInputError(f"{self.where} is empty")
        return self.tensor.detach().reshape(-1).to(torch.float64)

    @cached_property
    def central_moments(self) -> Tuple[float, float, float, float]:
        """``(mu, m2, m3, m4)`` with ``m_k = (1/N) sum_i (w_i - mu)^k``, computed once.

        Two passes over ``flat`` in chunks of ``CHUNK`` entries, so the temporaries stay small even for
        a pooled whole model."""
        w = self.flat
        mu = w.mean()
        sums = torch.zeros(3, dtype=torch.float64)
        for chunk in w.split(CHUNK):
            c = chunk - mu
            c2 = c * c
            sums += torch.stack([c2.sum(), (c2 * c).sum(), (c2 * c2).sum()])
        m2, m3, m4 = (sums / w.numel()).tolist()
        return float(mu), m2, m3, m4

    @cached_property
    def matrix(self) -> torch.Tensor:
        if self.tensor.dim() < 2:
            raise MetricInputError(
                f"{self.where} has shape {tuple(self.tensor.shape)}: a matrix metric needs a tensor with 2 or more dims"
            )
        return self.flat.reshape(self.tensor.shape[0], -1)

    @cached_property
    def singular_values(self) -> torch.Tensor:
        self.svd_calls += 1
        if self.factors is not None:
            return self.factors.compact_singular_values().to(torch.float64)
        return torch.linalg.svdvals(self.matrix)

    def release(self) -> None:
        """Drop the float64 copies (``flat``, ``matrix``); the tensor and singular values stay."""
        for key in ("flat", "matrix", "central_moments"):
            self.__dict__.pop(key, None)


class PooledData(LayerData):
    """Every selected tensor of one checkpoint taken together, for whole-model values.

    ``flat`` is the concatenation of all entries (``N = sum_l N_l``, one float64 copy);
    ``singular_values`` is the union of each layer's singular values, descending -- the spectrum of
    the block-diagonal matrix ``diag(W_1, ..., W_L)`` -- reusing the SVDs already made per layer.
    There is no single ``matrix``.
    """

    def __init__(self, layers: Sequence[LayerData], step: Optional[int] = None):
        if not layers:
            raise MetricInputError("whole model: no tensor selected")
        super().__init__("whole model", torch.empty(0), step)
        self.layers: List[LayerData] = list(layers)

    @property
    def where(self) -> str:
        return "the whole model" + (f" at step {self.step}" if self.step is not None else "")

    @cached_property
    def flat(self) -> torch.Tensor:
        total = sum(layer.tensor.numel() for layer in self.layers)
        flat = torch.empty(total, dtype=torch.float64)
        start = 0
        for layer in self.layers:  # copied in place: no per-layer float64 temporaries
            n = layer.tensor.numel()
            flat[start : start + n].copy_(layer.tensor.detach().reshape(-1))
            start += n
        return flat

    @cached_property
    def matrix(self) -> torch.Tensor:
        raise MetricInputError(f"{self.where} has no single matrix; use its pooled singular values")

    @cached_property
    def singular_values(self) -> torch.Tensor:
        return torch.cat([layer.singular_values for layer in self.layers]).sort(descending=True).values


class BaseMetric(_SettingsMixin):
    """A single-checkpoint metric of one tensor, with an optional whole-model value.

    ``whole_model``: ``"pooled"``, ``"mean"``, ``"sum"`` or ``None`` (see the module docstring).
    ``per_layer = False`` marks metrics that only have a whole-model value (``compute`` then gives
    the per-layer ingredient that :meth:`compute_whole` combines, e.g. ``norm_ratio``).
    """

    kind: ClassVar[str] = "tensor"
    needs_matrix: ClassVar[bool] = False
    whole_model: ClassVar[Optional[str]] = None
    per_layer: ClassVar[bool] = True

    def compute(self, layer: LayerData) -> float:
        raise NotImplementedError

    def compute_whole(self, pooled: PooledData, values: List[float]) -> float:
        """The whole-model value from the pooled data and the per-layer values (same order)."""
        if self.whole_model == "pooled":
            return self.compute(pooled)
        if self.whole_model == "mean":
            return float(sum(values) / len(values))
        if self.whole_model == "sum":
            return float(sum(values))
        raise NotImplementedError(f"metric '{self.name}' has no whole-model value")


class BaseComparativeMetric(_SettingsMixin):
    """A similarity between the same layer at the current and at a target checkpoint."""

    kind: ClassVar[str] = "comparative"
    needs_matrix: ClassVar[bool] = True

    def compare(self, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError


class BaseModelMetric(_SettingsMixin):
    """A metric of a whole model (needs ``--model FILE --class-name X``)."""

    kind: ClassVar[str] = "model"
    needs_matrix: ClassVar[bool] = False

    def compute_model(self, model: torch.nn.Module) -> float:
        raise NotImplementedError


def as_samples(tensor: torch.Tensor, where: str, data_type: str = "activations") -> torch.Tensor:
    """View a tensor as ``(n_samples, width)`` float64.

    Activations ``(..., d)`` become ``(-1, d)`` (every token is a sample); weights and gradients
    ``(out, ...)`` become ``(out, prod(rest))`` (every output unit is a sample).
    """
    if isinstance(tensor, LowRankProduct):
        tensor = tensor.product()
    if tensor.dim() < 2:
        raise MetricInputError(
            f"{where}: comparative metrics need (samples, features), got shape {tuple(tensor.shape)}"
        )
    if data_type == "activations":
        return tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float64)
    return tensor.detach().reshape(tensor.shape[0], -1).to(torch.float64)
