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

    ``interval``: measure every N optimizer steps; each measurement compares the weights with the
    snapshot taken at the previous measurement (or at ``start()``/the first call).
    ``snapshot_device``/``snapshot_dtype``: where and how snapshots are kept (float32 on CPU: 4 bytes
    per parameter). ``seed`` fixes the random masks of the sparse-quality baseline.
    """

    interval: int = 100
    snapshot_device: str = "cpu"
    snapshot_dtype: str = "float32"

    param_change_enabled: bool = True
    param_change_thresholds: List[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    param_change_per_layer: bool = False
    param_change_track_components: bool = False

    sparse_quality_enabled: bool = True
    sparse_quality_thresholds: List[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    sparse_quality_include_random: bool = True

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
        """Every metric, per-layer and per-component, with the random baseline, every 25 steps."""
        base = cls(
            interval=25,
            param_change_enabled=True,
            param_change_per_layer=True,
            param_change_track_components=True,
            sparse_quality_enabled=True,
            sparse_quality_include_random=True,
        )
        return replace(base, **overrides)
