"""``GradientMetrics``: size and spread of the gradients at a measurement step, globally and per layer.

Over the N gradient entries g of every parameter that has a ``.grad`` (the gradients of the step
that was just applied, so call ``on_optimizer_step`` after ``optimizer.step()`` and before
``optimizer.zero_grad()``):

    norm_l2  = sqrt(Σ g²)          mean = Σ g / N          variance = Σ (g − mean)² / N
    norm_max = max |g|

Per-tensor sums run in float64 and are merged with Chan's update (M2 = Σ M2_t + Σ n_t (mean_t −
mean)²), so the variance does not suffer the cancellation of Σg²/N − mean². Layers are the
repeated blocks of ``parameter_change.layer_index`` (``model.layers.3...`` -> 3).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.parameter_change import layer_index
from analog.monitor.primitives import ParameterDelta, ParameterSnapshot

PREFIX = "gradient/"


@dataclass(frozen=True)
class Moments:
    """n entries with mean ``mean``, M2 = Σ (x − mean)², Σ x² and max |x| (float64)."""

    n: int
    mean: float
    m2: float
    sq_total: float
    abs_max: float

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Moments":
        x = tensor.detach().reshape(-1).double()
        if x.numel() == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        mean = x.mean()
        return cls(
            x.numel(), float(mean), float((x - mean).square().sum()), float(x.square().sum()), float(x.abs().max())
        )

    @staticmethod
    def merge(parts: Iterable["Moments"]) -> "Moments":
        parts = [p for p in parts if p.n]
        n = sum(p.n for p in parts)
        if n == 0:
            return Moments(0, 0.0, 0.0, 0.0, 0.0)
        mean = sum(p.n * p.mean for p in parts) / n
        m2 = sum(p.m2 + p.n * (p.mean - mean) ** 2 for p in parts)
        return Moments(n, mean, m2, sum(p.sq_total for p in parts), max(p.abs_max for p in parts))

    def stats(self) -> Dict[str, float]:
        return {
            "norm_l2": math.sqrt(self.sq_total),
            "mean": self.mean,
            "variance": self.m2 / self.n if self.n else 0.0,
            "norm_max": self.abs_max,
        }


def gradients(model: nn.Module) -> Tuple[List[Tuple[str, torch.Tensor]], int]:
    """``(name, grad)`` of the parameters that have one, and how many trainable ones have none."""
    present, missing = [], 0
    for name, param in model.named_parameters():
        if param.grad is not None:
            present.append((name, param.grad))
        elif param.requires_grad:
            missing += 1
    return present, missing


class GradientMetrics(MetricComputer):
    """Keys (under ``gradient/``): ``norm_l2``, ``mean``, ``variance``, ``norm_max`` (module
    docstring), ``params_without_grad`` (trainable parameters whose ``.grad`` is None); with
    ``per_layer`` also ``layer_N/norm_l2``, ``layer_N/mean``, ``layer_N/variance``,
    ``layer_N/norm_max``. Raises ``ValueError`` (logged by the manager) when no parameter has a
    gradient: the gradients were cleared before the call.
    """

    def __init__(self, per_layer: bool = False):
        self.per_layer = per_layer

    def compute(
        self,
        delta: Optional[ParameterDelta] = None,
        snapshot: Optional[ParameterSnapshot] = None,
        context: Optional[AnalysisContext] = None,
        **kwargs,
    ) -> Dict[str, float]:
        model = context.model if context is not None else None
        if model is None:
            raise ValueError("GradientMetrics needs the model: on_optimizer_step(model, ...)")
        grads, missing = gradients(model)
        if not grads:
            raise ValueError(
                f"GradientMetrics: no parameter has a .grad at step {context.step}; call on_optimizer_step "
                "after optimizer.step() and before optimizer.zero_grad()"
            )
        moments = {name: Moments.of(grad) for name, grad in grads}
        metrics = {PREFIX + k: v for k, v in Moments.merge(moments.values()).stats().items()}
        metrics[PREFIX + "params_without_grad"] = float(missing)
        if self.per_layer:
            layers: Dict[int, List[Moments]] = defaultdict(list)
            for name, moment in moments.items():
                index = layer_index(name)
                if index is not None:
                    layers[index].append(moment)
            for index in sorted(layers):
                for key, value in Moments.merge(layers[index]).stats().items():
                    metrics[f"{PREFIX}layer_{index}/{key}"] = value
        return metrics
