"""Training monitor: parameter change, sparse-update quality, gradients and optimizer state during training.

```python
from analog.monitor import MonitorConfig, ModelAnalysisManager

analyzer = ModelAnalysisManager.create(MonitorConfig(interval=100))
for batch in loader:
    ...
    optimizer.step()
    metrics = analyzer.on_optimizer_step(model, inputs=batch, optimizer=optimizer)  # {} between measurements
```

``ModelAnalysisCallback`` (the Hugging Face ``Trainer`` callback) is imported on first access, so
this package imports without ``transformers``. ``MonitorConfig`` was called ``AnalysisConfig`` (the
GRAIL name); that name still works and warns.
"""

from analog._deprecated import deprecated_names
from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.config import MonitorConfig, format_threshold
from analog.monitor.gradient import GradientMetrics
from analog.monitor.manager import ModelAnalysisManager
from analog.monitor.momentum import MomentumMetrics
from analog.monitor.parameter_change import ParameterChangeMetrics
from analog.monitor.primitives import ParameterDelta, ParameterSetMismatch, ParameterSnapshot
from analog.monitor.sparse_quality import SparseQualityMetrics

__all__ = [
    "AnalysisContext",
    "GradientMetrics",
    "MetricComputer",
    "ModelAnalysisManager",
    "MomentumMetrics",
    "MonitorConfig",
    "ParameterChangeMetrics",
    "ParameterDelta",
    "ParameterSetMismatch",
    "ParameterSnapshot",
    "SparseQualityMetrics",
    "format_threshold",
]


_deprecated = deprecated_names("analog.monitor", {"AnalysisConfig": ("MonitorConfig", lambda: MonitorConfig)})


def __getattr__(name):
    if name == "ModelAnalysisCallback":
        from analog.monitor.hf import ModelAnalysisCallback

        return ModelAnalysisCallback
    return _deprecated(name)
