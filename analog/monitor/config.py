"""``MonitorConfig``: what the training monitor measures and how often."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List

from analog.monitor.primitives import resolve_dtype

DEFAULT_THRESHOLDS = (1e-8, 1e-6, 1e-4)


def format_threshold(threshold: float) -> str:
    """Metric-name form of a threshold: ``1e-06`` for 1e-6 (as ``f"{t:.0e}"``), ``0`` for 0.

    Thresholds that one significant digit cannot represent keep their ``%g`` form (``2.5e-05``).
    """
    if threshold == 0:
        return "0"
    short = f"{threshold:.0e}"
    return short if float(short) == threshold else f"{threshold:g}"


def _check_thresholds(name: str, values: List[float]) -> None:
    for value in values:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must hold finite numbers >= 0, got {value!r}")


@dataclass
class MonitorConfig:
    """Configuration of ``ModelAnalysisManager``.

    ``interval``: measure at every optimizer step that is a multiple of N, as GRAIL does; each
    measurement compares the weights with the snapshot of the previous one. Without ``start()``
    the first multiple (step N) only takes the reference and metrics come at 2N, 3N, ...; after
    ``start(model)`` (reference at step 0) they come at N, 2N, ...
    ``snapshot_device``/``snapshot_dtype``: where and how snapshots are kept (float32 on CPU: 4 bytes
    per parameter). ``seed`` fixes the random masks of the sparse-quality baseline.
    ``trainable_only``: snapshot and measure only parameters with ``requires_grad`` (default: all, as
    GRAIL). With adapters (LoRA) on a frozen base, N is then the adapters' size, so ratios such as
    ``changed_ratio_at_{t}`` are fractions of what can train rather than of the whole model, and the
    snapshot holds the adapters only; a parameter frozen or unfrozen between two measurements
    changes the set, which restarts the measurements (see ``ModelAnalysisManager``).
    ``gradient_enabled``: ``GradientMetrics`` (needs the gradients still present at the call);
    ``momentum_enabled``: ``MomentumMetrics`` (needs ``on_optimizer_step(..., optimizer=opt)``);
    ``*_per_layer`` adds their per-layer keys.
    """

    interval: int = 100
    snapshot_device: str = "cpu"
    snapshot_dtype: str = "float32"
    trainable_only: bool = False

    param_change_enabled: bool = True
    param_change_thresholds: List[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    param_change_per_layer: bool = False
    param_change_track_components: bool = False

    sparse_quality_enabled: bool = True
    sparse_quality_thresholds: List[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    sparse_quality_include_random: bool = True

    gradient_enabled: bool = False
    gradient_per_layer: bool = False
    momentum_enabled: bool = False
    momentum_per_layer: bool = False

    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be a positive integer, got {self.interval!r}")
        resolve_dtype(self.snapshot_dtype)
        self.param_change_thresholds = sorted(float(t) for t in self.param_change_thresholds)
        self.sparse_quality_thresholds = sorted(float(t) for t in self.sparse_quality_thresholds)
        _check_thresholds("param_change_thresholds", self.param_change_thresholds)
        _check_thresholds("sparse_quality_thresholds", self.sparse_quality_thresholds)

    @classmethod
    def minimal(cls, **overrides) -> "MonitorConfig":
        """Parameter-change statistics only, every 500 steps: negligible overhead."""
        base = cls(
            interval=500,
            param_change_enabled=True,
            param_change_per_layer=False,
            param_change_track_components=False,
            sparse_quality_enabled=False,
        )
        return replace(base, **overrides)

    @classmethod
    def comprehensive(cls, **overrides) -> "MonitorConfig":
        """Every metric (gradient and optimizer state included: pass ``optimizer=``), per layer and per
        component, with the random baseline, every 25 steps."""
        base = cls(
            interval=25,
            param_change_enabled=True,
            param_change_per_layer=True,
            param_change_track_components=True,
            sparse_quality_enabled=True,
            sparse_quality_include_random=True,
            gradient_enabled=True,
            gradient_per_layer=True,
            momentum_enabled=True,
            momentum_per_layer=True,
        )
        return replace(base, **overrides)
