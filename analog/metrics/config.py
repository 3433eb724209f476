"""The analysis config: pico-analyze's YAML schema, validated into frozen dataclasses.

Every key is checked; an unknown key or a bad value raises :class:`ConfigError` naming where it
is (``metrics[1].components[0].data_type``). Metric settings (``norm_type``, ``threshold``, ...)
sit beside ``metric_name`` as in pico-analyze and are checked by the metric class itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from .components import ComponentConfig
from .registry import COMPONENTS, METRICS

__all__ = ["AGGREGATIONS", "ConfigError", "MetricEntry", "MetricsConfig", "load_metrics_config", "parse_config"]

AGGREGATIONS = ("mean", "median", "min", "max", "sum")
TRANSITION_RULES = ("changepoint", "relative", "robust")
ENTRY_KEYS = ("metric_name", "data_split", "target_checkpoint", "components", "name", "aggregation", "whole_model")
COMPONENT_KEYS = ("component_name", "data_type", "layer_suffixes", "layers")


class ConfigError(ValueError):
    """An invalid analysis config; the message names the key."""


@dataclass(frozen=True)
class MetricEntry:
    """One ``metrics`` entry. ``label`` is its unique name in file names and ``metrics.csv``."""

    metric_name: str
    data_split: str = "val"
    target_checkpoint: Optional[int] = None
    components: Tuple[ComponentConfig, ...] = (ComponentConfig(),)
    settings: Tuple[Tuple[str, Any], ...] = ()
    aggregation: Optional[str] = None
    label: str = ""
    whole_model: bool = True


@dataclass(frozen=True)
class TransitionConfig:
    """Phase-transition rules (see :mod:`analog.metrics.transitions`); ``changepoint`` by default."""

    rules: Tuple[str, ...] = ("changepoint",)
    relative_threshold: float = 0.2
    z_threshold: float = 3.5
    penalty: float = 8.0
    min_jump: float = 0.1


@dataclass(frozen=True)
class MonitoringConfig:
    output_dir: str = "analysis_results"
    save_to_wandb: bool = False
    wandb: Tuple[Tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    analysis_name: str
    metrics: Tuple[MetricEntry, ...]
    steps: Optional[Tuple[int, ...]] = None
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    transitions: TransitionConfig = field(default_factory=TransitionConfig)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def _check_keys(raw: Any, allowed, where: str) -> Dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}")
    return raw


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _steps(raw: Any) -> Optional[Tuple[int, ...]]:
    if raw is None:
        return None
    if isinstance(raw, list):
        return tuple(_int(v, f"steps[{i}]") for i, v in enumerate(raw))
    spec = _check_keys(raw, ("start", "end", "step"), "steps")
    start, end = _int(spec.get("start", 0), "steps.start"), _int(spec.get("end"), "steps.end")
    step = _int(spec.get("step", 1), "steps.step")
    if step <= 0 or end < start:
        raise ConfigError(f"steps: need step > 0 and end >= start, got {spec}")
    return tuple(range(start, end + 1, step))


def _suffixes(raw: Any, where: str) -> Union[None, str, tuple]:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(v, str) for v in raw):
        return tuple(raw)
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return tuple(sorted(raw.items()))
    raise ConfigError(f"{where}: expected a string, a list of strings or a mapping of strings, got {raw!r}")


def _component(raw: Any, where: str) -> ComponentConfig:
    name = raw.get("component_name", "simple") if isinstance(raw, dict) else None
    if name not in COMPONENTS:
        raise ConfigError(
            f"{where}.component_name: unknown component {name!r}; registered: {', '.join(COMPONENTS.names())}"
        )
    cls = COMPONENTS.get(name)
    raw = _check_keys(raw, COMPONENT_KEYS + tuple(cls.options), where)
    layers = raw.get("layers")
    if layers is not None:
        if not isinstance(layers, list):
            raise ConfigError(f"{where}.layers: expected a list of integers, got {layers!r}")
        layers = tuple(_int(v, f"{where}.layers[{i}]") for i, v in enumerate(layers))
    options = []
    for key, kind in cls.options.items():
        if key in raw:
            if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
                raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {raw[key]!r}")
            options.append((key, raw[key]))
    config = ComponentConfig(
        name,
        raw.get("data_type", "weights"),
        _suffixes(raw.get("layer_suffixes"), f"{where}.layer_suffixes"),
        layers,
        tuple(options),
    )
    try:
        cls(config)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return config


def _entry(raw: Any, where: str) -> MetricEntry:
    if not isinstance(raw, dict) or "metric_name" not in raw:
        raise ConfigError(f"{where}: each metric needs a metric_name")
    name = raw["metric_name"]
    if name not in METRICS:
        raise ConfigError(f"{where}.metric_name: unknown metric {name!r}; registered: {', '.join(METRICS.names())}")
    cls = METRICS.get(name)
    raw = _check_keys(raw, ENTRY_KEYS + tuple(cls.settings), where)
    settings = {k: v for k, v in raw.items() if k in cls.settings}
    try:
        cls(**settings)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    target = raw.get("target_checkpoint")
    if cls.kind == "comparative" and target is None:
        raise ConfigError(f"{where}: comparative metric '{name}' needs target_checkpoint")
    if cls.kind != "comparative" and target is not None:
        raise ConfigError(f"{where}.target_checkpoint: metric '{name}' does not compare checkpoints")
    if raw.get("aggregation") is not None and raw["aggregation"] not in AGGREGATIONS:
        raise ConfigError(f"{where}.aggregation: {raw['aggregation']!r} is not one of {', '.join(AGGREGATIONS)}")
    comps = raw.get("components")
    if cls.kind == "model" and comps is not None:
        raise ConfigError(f"{where}.components: model metric '{name}' takes no components")
    if comps is not None and (not isinstance(comps, list) or not comps):
        raise ConfigError(f"{where}.components: expected a non-empty list")
    components = tuple(_component(c, f"{where}.components[{i}]") for i, c in enumerate(comps or [{}]))
    split = raw.get("data_split", "val")
    if not isinstance(split, str) or not _file_safe(split):
        raise ConfigError(f"{where}.data_split: expected a non-empty file-name-safe name (it names output files), "
                          f"got {split!r}")
    label = raw.get("name") or ""
    if not isinstance(label, str) or (label and not _file_safe(label)):
        raise ConfigError(
            f"{where}.name: expected a file-name-safe label of letters, digits, '_', '.', '=', '+', '-' "
            f"(it names output files), got {label!r}"
        )
    whole = raw.get("whole_model", True)
    if not isinstance(whole, bool):
        raise ConfigError(f"{where}.whole_model: expected true or false, got {whole!r}")
    target = None if target is None else _int(target, f"{where}.target_checkpoint")
    settings_items = tuple(sorted(settings.items()))
    return MetricEntry(name, split, target, components, settings_items, raw.get("aggregation"), label, whole)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-")


def _file_safe(text: str) -> bool:
    """A name that stays one file name under its directory: safe characters only, not '.' or '..'."""
    return bool(text) and _safe(text) == text and text.strip(".") != ""


def _differing_parts(entry: MetricEntry, same: List[MetricEntry]) -> List[str]:
    parts = []
    for key in ("data_split", "target_checkpoint", "aggregation"):
        if any(getattr(e, key) != getattr(entry, key) for e in same):
            parts.append(f"{key}={getattr(entry, key)}")
    settings = dict(entry.settings)
    for key in sorted({k for e in same + [entry] for k, _ in e.settings}):
        if any(dict(e.settings).get(key) != settings.get(key) for e in same):
            parts.append(f"{key}={settings.get(key)}")
    return parts


def _assign_labels(entries: List[MetricEntry]) -> List[MetricEntry]:
    """Give entries of one metric with different settings distinct labels; identical ones are an error.

    A label is the metric name plus the settings that differ from its namesakes; components are
    added (as a short hash) only when nothing else tells two entries apart.
    """
    base = []
    for i, entry in enumerate(entries):
        same = [e for j, e in enumerate(entries) if e.metric_name == entry.metric_name and j != i and not e.label]
        base.append(entry.label or _safe("__".join([entry.metric_name] + _differing_parts(entry, same))))
    counts = Counter(base)
    labelled = []
    for entry, label in zip(entries, base):
        if counts[label] > 1 and not entry.label:
            label += "__c" + hashlib.sha1(repr(entry.components).encode()).hexdigest()[:6]
        labelled.append(replace(entry, label=label))
    seen: Dict[str, int] = {}
    for i, entry in enumerate(labelled):
        if entry.label in seen:
            raise ConfigError(
                f"metrics[{seen[entry.label]}] and metrics[{i}] would both be saved as '{entry.label}': "
                "they are identical, or give them different 'name's"
            )
        seen[entry.label] = i
    return labelled


def parse_config(raw: Any) -> MetricsConfig:
    """Validate a config mapping (as loaded from YAML)."""
    raw = _check_keys(raw, ("analysis_name", "steps", "metrics", "monitoring", "transitions"), "config")
    name = raw.get("analysis_name")
    if not isinstance(name, str) or not _file_safe(name):
        raise ConfigError("analysis_name (the output directory's name): expected a non-empty name of letters, "
                          f"digits, '_', '.', '-' other than '.' and '..', got {name!r}")
    metrics = raw.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise ConfigError("metrics: expected a non-empty list of metric entries")
    entries = _assign_labels([_entry(m, f"metrics[{i}]") for i, m in enumerate(metrics)])
    mon = _check_keys(raw.get("monitoring") or {}, ("output_dir", "save_to_wandb", "wandb"), "monitoring")
    if not isinstance(mon.get("save_to_wandb", False), bool):
        raise ConfigError(f"monitoring.save_to_wandb: expected true or false, got {mon['save_to_wandb']!r}")
    wandb = _check_keys(mon.get("wandb") or {}, ("entity", "project", "name", "mode"), "monitoring.wandb")
    monitoring = MonitoringConfig(
        str(mon.get("output_dir", "analysis_results")), mon.get("save_to_wandb", False), tuple(sorted(wandb.items()))
    )
    return MetricsConfig(
        name, tuple(entries), _steps(raw.get("steps")), monitoring, parse_transitions(raw.get("transitions"))
    )


def parse_transitions(raw: Any) -> TransitionConfig:
    """Validate the ``transitions`` section (rules and their thresholds)."""
    numbers = ("relative_threshold", "z_threshold", "penalty", "min_jump")
    spec = _check_keys(raw or {}, ("rules",) + numbers, "transitions")
    rules = spec.get("rules", TransitionConfig.rules)
    rules = (rules,) if isinstance(rules, str) else tuple(rules or ())
    bad = [r for r in rules if r not in TRANSITION_RULES]
    if bad or not rules:
        raise ConfigError(f"transitions.rules: {bad or list(rules)} not in {', '.join(TRANSITION_RULES)}")
    values = {}
    for key in numbers:
        value = spec.get(key, getattr(TransitionConfig, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"transitions.{key}: expected a positive number, got {value!r}")
        values[key] = float(value)
    return TransitionConfig(rules, **values)


def load_metrics_config(path: Union[str, Path]) -> MetricsConfig:
    """Read and validate a YAML config; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
