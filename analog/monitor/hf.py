"""Hugging Face ``Trainer`` integration (needs ``transformers``; imported only when used).

```python
from analog.monitor import MonitorConfig, ModelAnalysisManager
from analog.monitor.hf import ModelAnalysisCallback

analyzer = ModelAnalysisManager.create(MonitorConfig(interval=100))
probe = {"input_ids": ids[:8], "attention_mask": mask[:8]}          # fixed batch for sparse quality
trainer = Trainer(..., callbacks=[ModelAnalysisCallback(analyzer, probe_inputs=probe)])
```
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from transformers import TrainerCallback

from analog.monitor.manager import ModelAnalysisManager


class ModelAnalysisCallback(TrainerCallback):
    """Calls ``analyzer.on_optimizer_step(model, inputs=probe_inputs, optimizer=optimizer)`` right
    after every optimizer step of a ``Trainer`` (its ``on_optimizer_step`` event, while the gradients
    are still there) and logs the metrics at ``on_step_end`` with the new ``global_step``.

    The Trainer does not hand the batch to callbacks, so sparse-quality metrics use
    ``probe_inputs``, a fixed batch (the same inputs at every measurement make them comparable).
    Metrics are prefixed with ``prefix``, kept in ``history`` as ``(step, metrics)``, and sent to
    ``log_fn(metrics)`` when given (``wandb.log``, a TensorBoard writer, ...); otherwise they are
    appended with their ``step`` to ``state.log_history``, so they land in ``trainer_state.json``.
    """

    def __init__(
        self,
        analyzer: ModelAnalysisManager,
        probe_inputs: Any = None,
        log_fn: Optional[Callable[[Dict[str, float]], Any]] = None,
        prefix: str = "analysis/",
    ):
        self.analyzer = analyzer
        self.probe_inputs = probe_inputs
        self.log_fn = log_fn
        self.prefix = prefix
        self.history: List[tuple] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.analyzer.start(model, step=state.global_step)  # a resumed run keeps its schedule
        self._pending: Dict[str, float] = {}

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Right after ``optimizer.step()``, before the Trainer clears the gradients."""
        if model is not None:
            self._pending = self.analyzer.on_optimizer_step(model, inputs=self.probe_inputs, optimizer=optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        metrics, self._pending = getattr(self, "_pending", {}), {}
        if not metrics:
            return
        logged = {self.prefix + key: value for key, value in metrics.items()}
        self.history.append((state.global_step, logged))
        if self.log_fn is not None:
            self.log_fn(logged)
        else:
            state.log_history.append({**logged, "step": state.global_step})
