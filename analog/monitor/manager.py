"""``ModelAnalysisManager``: snapshot lifecycle, measurement intervals and fail-safe orchestration."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from torch import nn

from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.config import MonitorConfig
from analog.monitor.gradient import GradientMetrics
from analog.monitor.momentum import MomentumMetrics
from analog.monitor.parameter_change import ParameterChangeMetrics
from analog.monitor.primitives import ParameterDelta, ParameterSetMismatch, ParameterSnapshot
from analog.monitor.sparse_quality import SparseQualityMetrics

logger = logging.getLogger(__name__)


class ModelAnalysisManager:
    """Runs metric computers every ``config.interval`` optimizer steps.

    Call ``on_optimizer_step(model, inputs=batch, optimizer=opt)`` after every ``optimizer.step()``
    (before ``optimizer.zero_grad()`` when gradient metrics are on). At every step that is a
    multiple of ``interval`` (GRAIL's schedule) the first call takes the reference snapshot and the
    later ones run every computer on Δ = W_now − W_reference, the current weights becoming the new
    reference; ``start(model)`` before training takes the reference at step 0 instead, so metrics
    start at step ``interval``. Between measurements the call returns ``{}``.

    Nothing here stops training: a failing computer is logged (``last_errors`` keeps the message)
    and the others still report; a parameter set that changed between snapshots is logged and the
    manager starts over from the current weights.
    """

    def __init__(self, config: Optional[MonitorConfig] = None):
        self.config = config if config is not None else MonitorConfig()
        self.computers: List[MetricComputer] = []
        self.last_errors: Dict[str, str] = {}
        self.reset()

    @classmethod
    def create(cls, config: Optional[MonitorConfig] = None) -> "ModelAnalysisManager":
        """A manager with the computers ``config`` enables."""
        config = config if config is not None else MonitorConfig()
        manager = cls(config)
        if config.param_change_enabled:
            manager.add_metric(
                ParameterChangeMetrics(
                    thresholds=config.param_change_thresholds,
                    per_layer=config.param_change_per_layer,
                    track_components=config.param_change_track_components,
                )
            )
        if config.gradient_enabled:
            manager.add_metric(GradientMetrics(per_layer=config.gradient_per_layer))
        if config.momentum_enabled:
            manager.add_metric(MomentumMetrics(per_layer=config.momentum_per_layer))
        if config.sparse_quality_enabled:
            manager.add_metric(
                SparseQualityMetrics(
                    thresholds=config.sparse_quality_thresholds,
                    include_random=config.sparse_quality_include_random,
                    seed=config.seed,
                )
            )
        return manager

    def add_metric(self, computer: MetricComputer) -> "ModelAnalysisManager":
        """Append a computer (anything with ``compute(**kwargs) -> dict``); returns self for chaining."""
        if not callable(getattr(computer, "compute", None)):
            raise TypeError(f"{computer!r} has no compute() method")
        self.computers.append(computer)
        return self

    def reset(self) -> None:
        """Forget the reference snapshot and the step count; the next call starts afresh."""
        self.step = 0
        self._snapshot: Optional[ParameterSnapshot] = None

    @property
    def snapshot(self) -> Optional[ParameterSnapshot]:
        """The current reference snapshot (None before the first call or after a reset)."""
        return self._snapshot

    def start(self, model: nn.Module, step: int = 0) -> None:
        """Take the reference snapshot now, before optimizer step ``step + 1`` (``step``: the
        optimizer steps already done, e.g. a resumed run's global step)."""
        self.reset()
        self.step = int(step)
        self._snapshot = self._capture(model)

    def state_dict(self) -> Dict[str, int]:
        """The step count (snapshots are not saved: after ``load_state_dict`` the next multiple of
        ``interval`` takes a new reference)."""
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.reset()
        self.step = int(state["step"])

    def on_optimizer_step(
        self, model: nn.Module, inputs: Any = None, optimizer: Any = None, **metadata: Any
    ) -> Dict[str, float]:
        """Count one optimizer step; at a multiple of ``interval`` take the reference or measure.
        ``optimizer`` and ``metadata`` reach the computers through ``AnalysisContext``."""
        self.step += 1
        try:
            if self.step % self.config.interval != 0:
                return {}
            if self._snapshot is None:
                self._snapshot = self._capture(model)
                return {}
            context = AnalysisContext(model, inputs, self.step, optimizer, dict(metadata))
            return self._measure(model, context)
        except Exception as error:  # the monitor must never stop training
            logger.warning("model analysis skipped at step %d: %s", self.step, error, exc_info=True)
            self.last_errors = {"manager": repr(error)}
            return {}

    def _capture(self, model: nn.Module) -> ParameterSnapshot:
        return ParameterSnapshot.capture(
            model,
            device=self.config.snapshot_device,
            dtype=self.config.snapshot_dtype,
            step=self.step,
            trainable_only=self.config.trainable_only,
        )

    def _measure(self, model: nn.Module, context: AnalysisContext) -> Dict[str, float]:
        new = self._capture(model)
        old = self._snapshot
        try:
            delta = ParameterDelta.between(old, new)
        except ParameterSetMismatch as error:
            logger.warning(
                "model analysis reset at step %d: %s. Metrics restart from the current weights.",
                self.step,
                error,
            )
            self._snapshot = new
            self.last_errors = {"manager": str(error)}
            return {}
        metrics: Dict[str, float] = {}
        self.last_errors = {}
        for computer in self.computers:
            name = getattr(computer, "name", type(computer).__name__)
            try:
                metrics.update(computer.compute(delta=delta, snapshot=old, context=context))
            except Exception as error:
                logger.warning("metric %s failed at step %d: %r", name, self.step, error, exc_info=True)
                self.last_errors[name] = repr(error)
        self._snapshot = new
        return metrics
