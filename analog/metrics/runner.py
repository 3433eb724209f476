"""Run an analysis: one checkpoint in memory at a time, every metric entry on it, then the outputs.

Per step: each (component, split) is extracted once into :class:`LayerData` objects that all
entries share, so a matrix used by several spectral metrics is decomposed once. Comparative
entries keep only their target's component tensors (not the whole target checkpoint).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from analog.checkpoints import (
    Checkpoint,
    CheckpointRef,
    discover_checkpoints,
    load_model_class,
    load_strict,
    select_steps,
)
from analog.checkpoints.run_config import attention_head_counts

from .base import LayerData, MetricInputError, PooledData, as_samples
from .components import BaseComponent, OVCircuitComponent
from .config import MetricEntry, MetricsConfig
from .output import ResultWriter, Row
from .registry import COMPONENTS, METRICS

__all__ = ["ModelSpec", "run_metrics"]

_AGGREGATE = {"mean": statistics.fmean, "median": statistics.median, "min": min, "max": max, "sum": sum}


@dataclass
class ModelSpec:
    """A model class file for metrics that run the model (``--model FILE --class-name X``)."""

    path: str
    class_name: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    entry: MetricEntry
    metric: Any
    components: List[BaseComponent]
    targets: List[Dict[str, torch.Tensor]] = field(default_factory=list)


def _build_plans(config: MetricsConfig, run_path: Path, refs: List[CheckpointRef]) -> List[_Plan]:
    """One plan per entry. The run's model config is read only when an ``ov_circuit`` lacks ``n_heads``."""
    plans, heads = [], None
    for entry in config.metrics:
        metric = METRICS.get(entry.metric_name)(**dict(entry.settings))
        components = [COMPONENTS.get(c.component_name)(c) for c in entry.components]
        for component in components:
            if isinstance(component, OVCircuitComponent) and component.n_heads is None:
                heads = heads or attention_head_counts(run_path, refs)
                component.set_model_config(*heads)
        plans.append(_Plan(entry, metric, [] if metric.kind == "model" else components))
    return plans


def _load_targets(plans: List[_Plan], refs: Dict[int, CheckpointRef], allow_pickle: bool) -> None:
    for plan in plans:
        if plan.metric.kind != "comparative":
            continue
        step = plan.entry.target_checkpoint
        if step not in refs:
            raise ValueError(
                f"target_checkpoint {step} of metric '{plan.entry.label}' not found; steps: {sorted(refs)}"
            )
        with Checkpoint(refs[step], allow_pickle) as ckpt:
            for comp in plan.components:
                data = comp.extract(ckpt, plan.entry.data_split)
                where = f"target step {step}"
                # with every tensor selected, the layers _layer_value skips (biases, integer buffers) need no target
                keep = (lambda v: v.is_floating_point() and v.dim() >= 2) if comp.selects_all else (lambda v: True)
                kind = comp.config.data_type
                plan.targets.append(
                    {k: as_samples(v, f"{where} layer '{k}'", kind) for k, v in data.items() if keep(v)}
                )


def _layer_value(plan: _Plan, index: int, layer: LayerData) -> Optional[float]:
    """One metric on one layer; ``None`` when an all-tensors component skips the layer."""
    metric, comp = plan.metric, plan.components[index]
    if comp.selects_all and (not layer.tensor.is_floating_point() or (metric.needs_matrix and layer.tensor.dim() < 2)):
        return None
    if metric.kind != "comparative":
        return metric.compute(layer)
    target = plan.targets[index].get(layer.name)
    if target is None:
        raise KeyError(f"layer '{layer.name}' at step {layer.step} has no counterpart in the target checkpoint")
    x = as_samples(layer.tensor, layer.where, comp.config.data_type)
    if x.shape[0] != target.shape[0]:
        raise MetricInputError(f"{layer.where}: {x.shape[0]} samples vs {target.shape[0]} in the target checkpoint")
    try:
        return metric.compare(x, target)
    except MetricInputError as exc:
        raise MetricInputError(f"{layer.where} against target step {plan.entry.target_checkpoint}: {exc}") from exc


Key = Tuple[int, int]  # (plan index, component index)


def _wants_whole(plan: _Plan) -> bool:
    return plan.entry.whole_model and plan.metric.kind == "tensor" and plan.metric.whole_model is not None


def _step_values(plans: List[_Plan], ckpt: Checkpoint) -> Tuple[Dict[Key, Dict[str, float]], Dict[Key, float]]:
    """``values[(plan, component)][layer]`` and whole-model ``whole[(plan, component)]`` at one step.

    Plans sharing a (component, split) extract it once; each layer's :class:`LayerData` (and its
    single SVD) serves every plan. A layer is kept (tensor and singular values, not its float64
    copies) only while some plan of its group still needs a whole-model value.
    """
    groups: Dict[tuple, List[Key]] = {}
    for p, plan in enumerate(plans):
        for c, comp in enumerate(plan.components):
            groups.setdefault((comp.config.key(), plan.entry.data_split), []).append((p, c))
    values: Dict[Key, Dict[str, float]] = {users: {} for users in sum(groups.values(), [])}
    whole: Dict[Key, float] = {}
    for (_, split), users in groups.items():
        first_plan, first_comp = users[0]
        data = plans[first_plan].components[first_comp].extract_data(ckpt, split)
        kept: Dict[Key, List[LayerData]] = {key: [] for key in users}
        for name in list(data):
            layer = LayerData(name, data.pop(name), ckpt.step)
            for p, c in users:
                try:
                    value = _layer_value(plans[p], c, layer)
                except MetricInputError as exc:
                    raise MetricInputError(f"metric '{plans[p].entry.label}': {exc}") from exc
                if value is not None:
                    values[(p, c)][name] = value
                    if _wants_whole(plans[p]) and plans[p].components[c].pools(name):
                        kept[(p, c)].append(layer)
            layer.release()
        whole.update(_whole_values(plans, kept, values, ckpt.step))
    return values, whole


def _whole_values(plans: List[_Plan], kept: Dict[Key, List[LayerData]], values, step: int) -> Dict[Key, float]:
    """Whole-model values of one group; one :class:`PooledData` per distinct set of layers."""
    pools: Dict[tuple, PooledData] = {}
    out: Dict[Key, float] = {}
    for (p, c), layers in kept.items():
        metric = plans[p].metric
        if not layers or (len(layers) < 2 and metric.per_layer):
            continue  # one layer: its own value already is the whole
        names = tuple(layer.name for layer in layers)
        pooled = pools.setdefault(names, PooledData(layers, step))
        try:
            out[(p, c)] = metric.compute_whole(pooled, [values[(p, c)][n] for n in names])
        except MetricInputError as exc:
            raise MetricInputError(f"metric '{plans[p].entry.label}': {exc}") from exc
    return out


def _entry_rows(p: int, plan: _Plan, step: int, values: dict, whole: dict, model) -> List[Row]:
    entry = plan.entry
    if plan.metric.kind == "model":
        return [Row(step, entry.label, "model", "model", plan.metric.compute_model(model))]
    rows = []
    if getattr(plan.metric, "per_layer", True):
        for c, comp in enumerate(plan.components):
            rows += [Row(step, entry.label, comp.label, name, v) for name, v in values[(p, c)].items()]
    if entry.aggregation and rows:
        finite = [r.value for r in rows if r.value == r.value]
        value = float(_AGGREGATE[entry.aggregation](finite)) if finite else float("nan")
        rows.append(Row(step, entry.label, "aggregate", f"{entry.aggregation} over layers", value))
    labels = [comp.label for comp in plan.components]
    for c, comp in enumerate(plan.components):
        if (p, c) in whole:
            name = f"whole_model.{comp.label}" + (f".{c}" if labels.count(comp.label) > 1 else "")
            rows.append(Row(step, entry.label, "whole_model", name, whole[(p, c)]))
    return rows


def _build_model(spec: Optional[ModelSpec], plans: List[_Plan]):
    if not any(p.metric.kind == "model" for p in plans):
        return None
    if spec is None:
        names = ", ".join(p.entry.label for p in plans if p.metric.kind == "model")
        raise ValueError(f"metric(s) {names} run the model: pass --model FILE.py --class-name NAME")
    return load_model_class(spec.path, spec.class_name)(**spec.kwargs)


def run_metrics(
    config: MetricsConfig,
    run_path,
    *,
    output_dir: Optional[str] = None,
    allow_pickle: bool = False,
    model: Optional[ModelSpec] = None,
    quiet: bool = False,
) -> Dict[str, Path]:
    """Compute every metric entry of ``config`` on the checkpoints under ``run_path``.

    Writes under ``output_dir / analysis_name`` and returns the paths of ``metrics.csv``,
    ``transitions.json`` and ``report.html`` (plus ``out_dir``).
    """
    run_path = Path(run_path)
    all_refs = discover_checkpoints(run_path)
    refs = select_steps(all_refs, config.steps)
    plans = _build_plans(config, run_path, all_refs)
    _load_targets(plans, {r.step: r for r in all_refs}, allow_pickle)
    net = _build_model(model, plans)
    out_dir = Path(output_dir or config.monitoring.output_dir) / config.analysis_name
    available = {r.step for r in all_refs}
    missing = sorted({s for s in config.steps or () if s not in available})
    writer = ResultWriter(out_dir, {**config.to_dict(), "missing_steps": missing})
    wandb_run = _start_wandb(config) if config.monitoring.save_to_wandb else None
    bar = tqdm(refs, desc="checkpoints", unit="ckpt", disable=quiet or not sys.stderr.isatty())
    for ref in bar:
        bar.set_postfix(step=ref.step)
        with Checkpoint(ref, allow_pickle) as ckpt:
            if net is not None:
                load_strict(net, ckpt.state_dict(), f"step {ref.step} ({ref.path})")
            values, whole = _step_values(plans, ckpt)
            results = {
                (plan.entry.label, plan.entry.data_split): _entry_rows(p, plan, ref.step, values, whole, net)
                for p, plan in enumerate(plans)
            }
        writer.write_step(ref.step, results)
        if wandb_run is not None:
            wandb_run.log({f"{r.metric}/{r.layer}": r.value for rows in results.values() for r in rows}, step=ref.step)
    if wandb_run is not None:
        wandb_run.finish()
    paths = writer.finish(config.transitions, title=config.analysis_name)
    return {"out_dir": out_dir, **{k.split(".")[0]: v for k, v in paths.items()}}


def _start_wandb(config: MetricsConfig):
    """Only imported when ``monitoring.save_to_wandb`` is true."""
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("monitoring.save_to_wandb is true but wandb is not installed: pip install wandb") from exc
    settings = dict(config.monitoring.wandb)
    return wandb.init(
        entity=settings.get("entity"),
        project=settings.get("project"),
        name=settings.get("name", config.analysis_name),
        mode=settings.get("mode"),
        config=config.to_dict(),
    )
