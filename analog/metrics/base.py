"""Metric interfaces and the per-layer data object that shares one SVD between spectral metrics.

Three kinds of metric, each a small class with an exact interface:

* :class:`BaseMetric` -- ``compute(layer: LayerData) -> float`` on one tensor of one checkpoint;
  ``needs_matrix = True`` marks metrics defined on a matrix (singular values, rows/columns).
* :class:`BaseComparativeMetric` -- ``compare(x, y) -> float`` between two ``(n, d)`` matrices whose
  rows are paired samples (the current checkpoint and a target checkpoint; widths may differ).
* :class:`BaseModelMetric` -- ``compute_model(model) -> float`` on a model built from a checkpoint.

Settings are declared as :class:`Setting` and validated when the metric is built, so a bad value
is an error naming the setting before any checkpoint is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import torch

__all__ = [
    "BaseComparativeMetric",
    "BaseMetric",
    "BaseModelMetric",
    "LayerData",
    "MetricInputError",
    "Setting",
    "as_samples",
]


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


class LayerData:
    """One layer's tensor with lazily computed views, each computed at most once.

    ``flat``: float64 vector of all entries. ``matrix``: float64 ``(shape[0], prod(shape[1:]))``
    (a conv kernel ``(out, in, kh, kw)`` becomes ``(out, in*kh*kw)``). ``singular_values``:
    ``svdvals(matrix)`` in descending order, computed once and shared by every spectral metric
    (``svd_calls`` counts the decompositions).
    """

    def __init__(self, name: str, tensor: torch.Tensor, step: Optional[int] = None):
        self.name = name
        self.tensor = tensor
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
        """``(mu, m2, m3, m4)`` with ``m_k = (1/N) sum_i (w_i - mu)^k``, computed once."""
        w = self.flat
        mu = w.mean()
        c = w - mu
        c2 = c * c
        return float(mu), float(c2.mean()), float((c2 * c).mean()), float((c2 * c2).mean())

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
        return torch.linalg.svdvals(self.matrix)


class BaseMetric(_SettingsMixin):
    """A single-checkpoint metric of one tensor."""

    kind: ClassVar[str] = "tensor"
    needs_matrix: ClassVar[bool] = False

    def compute(self, layer: LayerData) -> float:
        raise NotImplementedError


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
    if tensor.dim() < 2:
        raise MetricInputError(
            f"{where}: comparative metrics need (samples, features), got shape {tuple(tensor.shape)}"
        )
    if data_type == "activations":
        return tensor.detach().reshape(-1, tensor.shape[-1]).to(torch.float64)
    return tensor.detach().reshape(tensor.shape[0], -1).to(torch.float64)
