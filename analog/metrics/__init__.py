"""Checkpoint metrics: components, single and comparative metrics, phase transitions, a report.

Python API::

    from analog.metrics import load_config, run_analysis
    paths = run_analysis(load_config("cfg.yaml"), "runs/my_run")

Register your own with ``@register_metric("name")`` on a :class:`BaseMetric` subclass, or
``@register_component("name")`` on a :class:`BaseComponent` subclass.
"""

from . import comparative, elementwise, spectral  # noqa: F401  (registers the built-in metrics)
from .base import BaseComparativeMetric, BaseMetric, BaseModelMetric, LayerData, MetricInputError, Setting
from .comparative import linear_cka, pwcca, svcca
from .components import BaseComponent, ComponentConfig
from .config import AnalysisConfig, ConfigError, load_config, parse_config
from .custom import load_custom_metrics
from .registry import COMPONENTS, METRICS, register_component, register_metric
from .runner import ModelSpec, run_analysis
from .transitions import detect_transitions, relative_change_transitions, robust_transitions

__all__ = [
    "AnalysisConfig",
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
    "ModelSpec",
    "Setting",
    "detect_transitions",
    "linear_cka",
    "load_config",
    "load_custom_metrics",
    "parse_config",
    "pwcca",
    "register_component",
    "register_metric",
    "relative_change_transitions",
    "robust_transitions",
    "run_analysis",
    "svcca",
]
