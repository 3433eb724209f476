"""Training monitor: parameter-change and sparse-update-quality metrics during training.

```python
from analog.monitor import AnalysisConfig, ModelAnalysisManager

analyzer = ModelAnalysisManager.create(AnalysisConfig(interval=100))
for batch in loader:
    ...
    optimizer.step()
    metrics = analyzer.on_optimizer_step(model, inputs=batch)   # {} between measurements
```

``ModelAnalysisCallback`` (the Hugging Face ``Trainer`` callback) is imported on first access, so
this package imports without ``transformers``.
"""

from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.config import AnalysisConfig, format_threshold
from analog.monitor.manager import ModelAnalysisManager
from analog.monitor.parameter_change import ParameterChangeMetrics
from analog.monitor.primitives import ParameterDelta, ParameterSetMismatch, ParameterSnapshot
from analog.monitor.sparse_quality import SparseQualityMetrics

__all__ = [
    "AnalysisConfig",
    "AnalysisContext",
    "MetricComputer",
    "ModelAnalysisManager",
    "ParameterChangeMetrics",
    "ParameterDelta",
    "ParameterSetMismatch",
    "ParameterSnapshot",
    "SparseQualityMetrics",
    "format_threshold",
]


def __getattr__(name):
    if name == "ModelAnalysisCallback":
        from analog.monitor.hf import ModelAnalysisCallback

        return ModelAnalysisCallback
    raise AttributeError(f"module 'analog.monitor' has no attribute {name!r}")
