"""``ParameterChangeMetrics``: size and sparsity of Δ = W_new − W_old, globally, per layer, per component."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from analog.monitor.base import AnalysisContext, MetricComputer
from analog.monitor.config import DEFAULT_THRESHOLDS, format_threshold
from analog.monitor.primitives import ParameterDelta, ParameterSnapshot, TensorStats

PREFIX = "param_change/"
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> Optional[int]:
    """Index of the repeated block a parameter lives in: the first integer part of its dotted name.

    ``model.layers.3.mlp.up_proj.weight`` -> 3; ``lm_head.weight`` -> None.
    """
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def component_names(param_names: Iterable[str]) -> Dict[str, str]:
    """Component of each parameter: the module that owns it, named as briefly as stays unambiguous.

    The path inside the block is the module path after the layer index (``self_attn.q_proj``);
    its last part (``q_proj``) is used when no other path shares it, else the whole path, so
    GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` stay apart while Llama's ``q_proj``/``gate_proj``
    keep their short names. Parameters owned by the model itself are named ``(root)``.
    """
    paths = {}
    for name in param_names:
        parts = name.split(".")[:-1]
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        inner = parts[digits[0] + 1 :] if digits else parts[-1:]
        inner = [part for part in inner if not part.isdigit()]
        paths[name] = ".".join(inner) if inner else "(root)"
    leaf_to_paths = defaultdict(set)
    for path in paths.values():
        leaf_to_paths[path.split(".")[-1]].add(path)
    return {
        name: path.split(".")[-1] if len(leaf_to_paths[path.split(".")[-1]]) == 1 else path
        for name, path in paths.items()
    }


def _group_stats(stats: Sequence[TensorStats]) -> Dict[str, float]:
    """mean_abs_delta = Σ|Δ|/n, norm_l2 = sqrt(ΣΔ²), sparsity = #{|Δ| ≤ t_min}/n over a group."""
    numel = sum(s.numel for s in stats)
    return {
        "mean_abs_delta": sum(s.abs_total for s in stats) / numel if numel else 0.0,
        "norm_l2": math.sqrt(sum(s.sq_total for s in stats)),
        "sparsity": sum(s.at_most[0] for s in stats) / numel if numel else 1.0,
        "numel": float(numel),
    }


class ParameterChangeMetrics(MetricComputer):
    """Magnitude and sparsity of the parameter change between two measurements.

    Keys (all under ``param_change/``): ``norm_l2``, ``norm_l1``, ``norm_max``, ``mean``, ``std``
    (see ``ParameterDelta``), ``sparsity_at_{t}`` = #{|Δ| ≤ t}/N and ``changed_ratio_at_{t}`` =
    1 − sparsity_at_{t} for each threshold t. With ``per_layer``: ``layer_N/mean_abs_delta``,
    ``layer_N/norm_l2``, ``layer_N/sparsity``; with ``track_components``:
    ``component/<name>/...`` with the same statistics (see ``component_names``). Group sparsity
    uses the smallest threshold.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        per_layer: bool = False,
        track_components: bool = False,
    ):
        if not thresholds:
            raise ValueError("ParameterChangeMetrics needs at least one threshold")
        self.thresholds = sorted(float(t) for t in thresholds)
        self.per_layer = per_layer
        self.track_components = track_components

    def compute(
        self,
        delta: ParameterDelta,
        snapshot: Optional[ParameterSnapshot] = None,
        context: Optional[AnalysisContext] = None,
        **kwargs,
    ) -> Dict[str, float]:
        stats = delta.tensor_stats(self.thresholds)
        metrics = {
            PREFIX + "norm_l2": delta.norm_l2,
            PREFIX + "norm_l1": delta.norm_l1,
            PREFIX + "norm_max": delta.norm_max,
            PREFIX + "mean": delta.mean,
            PREFIX + "std": delta.std,
        }
        for threshold in self.thresholds:
            label = format_threshold(threshold)
            sparsity = delta.sparsity(threshold)
            metrics[f"{PREFIX}sparsity_at_{label}"] = sparsity
            metrics[f"{PREFIX}changed_ratio_at_{label}"] = 1.0 - sparsity
        if self.per_layer:
            metrics.update(_group_metrics(stats, lambda names: {n: layer_index(n) for n in names}, "layer_{}/"))
        if self.track_components:
            metrics.update(_group_metrics(stats, component_names, "component/{}/"))
        return metrics


def _group_metrics(stats: Mapping[str, TensorStats], key_fn, pattern: str) -> Dict[str, float]:
    """Statistics of the groups ``key_fn(names)[name]`` (names keyed None are left out)."""
    keys = key_fn(list(stats))
    groups: Dict[object, List[TensorStats]] = defaultdict(list)
    for name, stat in stats.items():
        if keys[name] is not None:
            groups[keys[name]].append(stat)
    out = {}
    for key in sorted(groups, key=lambda k: str(k).zfill(8)):
        for stat, value in _group_stats(groups[key]).items():
            out[PREFIX + pattern.format(key) + stat] = value
    return out
