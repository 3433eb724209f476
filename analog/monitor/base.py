"""``MetricComputer``: the interface of a stateless monitor metric, and the context it receives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from torch import nn

from analog.monitor.primitives import ParameterDelta, ParameterSnapshot


@dataclass(frozen=True)
class AnalysisContext:
    """What a computer may look at besides the delta.

    ``model`` holds the current weights W_new; ``inputs`` is the batch given to
    ``on_optimizer_step`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments), or None; ``step`` is the optimizer step of the measurement; ``optimizer`` the
    optimizer given to ``on_optimizer_step`` (or None); ``metadata`` its other keyword arguments.
    """

    model: Optional[nn.Module] = None
    inputs: Any = None
    step: int = 0
    optimizer: Any = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attention_mask(self) -> Any:
        """``inputs["attention_mask"]`` when the inputs are a mapping holding one (GRAIL's field), else None."""
        return self.inputs.get("attention_mask") if isinstance(self.inputs, Mapping) else None


class MetricComputer(ABC):
    """A stateless metric: ``compute(delta=..., snapshot=..., context=...) -> {name: float}``.

    The manager always calls ``compute`` with keyword arguments: ``delta`` (Δ = W_new − W_old, a
    ``ParameterDelta``), ``snapshot`` (W_old, the ``ParameterSnapshot`` the delta starts from) and
    ``context`` (an ``AnalysisContext``). A computer keeps no state between calls, must not modify
    its arguments, and returns a flat dict of Python floats (empty when it has nothing to say).
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def compute(
        self,
        delta: ParameterDelta,
        snapshot: ParameterSnapshot,
        context: AnalysisContext,
        **kwargs: Any,
    ) -> Dict[str, float]:
        """Return the metrics of one measurement."""
