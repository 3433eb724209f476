"""Checkpoint metrics: components, single and comparative metrics, phase transitions, a report.

Python API (``MetricsConfig``, ``load_metrics_config`` and ``run_metrics`` were called
``AnalysisConfig``, ``load_config`` and ``run_analysis`` before; those names still work and warn)::

    from analog.metrics import load_metrics_config, run_metrics
    paths = run_metrics(load_metrics_config("cfg.yaml"), "runs/my_run")

Register your own with ``@register_metric("name")`` on a :class:`BaseMetric` subclass, or
``@register_component("name")`` on a :class:`BaseComponent` subclass.
"""

from analog._deprecated import deprecated_names

from . import comparative, elementwise, layerwise, spectral  # noqa: F401  (registers the built-in metrics)
from .base import BaseComparativeMetric, BaseMetric, BaseModelMetric, LayerData, MetricInputError, Setting
from .comparative import linear_cka, pwcca, svcca
from .components import BaseComponent, ComponentConfig
from .config import ConfigError, MetricsConfig, load_metrics_config, parse_config
from .custom import load_custom_metrics
from .registry import COMPONENTS, METRICS, register_component, register_metric
from .runner import ModelSpec, run_metrics
from .transitions import (
    changepoint_transitions,
    detect_transitions,
    relative_change_transitions,
    robust_transitions,
)

__all__ = [
    "BaseComparativeMetric",
    "BaseComponent",
    "BaseMetric",
    "BaseModelMetric",
    "COMPONENTS",
    "ComponentConfig",
    "ConfigError",
    "LayerData",
    "METRICS",
    "MetricInputError",
    "MetricsConfig",
    "ModelSpec",
    "Setting",
    "changepoint_transitions",
    "detect_transitions",
    "linear_cka",
    "load_metrics_config",
    "load_custom_metrics",
    "parse_config",
    "pwcca",
    "register_component",
    "register_metric",
    "relative_change_transitions",
    "robust_transitions",
    "run_metrics",
    "svcca",
]

__getattr__ = deprecated_names(
    "analog.metrics",
    {
        "AnalysisConfig": ("MetricsConfig", lambda: MetricsConfig),
        "load_config": ("load_metrics_config", lambda: load_metrics_config),
        "run_analysis": ("run_metrics", lambda: run_metrics),
    },
)
