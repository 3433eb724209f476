"""``analog metrics``: checkpoint metrics from a YAML config or a quick list of metric names.

analog metrics --config cfg.yaml --run-path DIR
analog metrics --dir DIR --metrics spectral,entropy,per [--data-type weights] [--layer-suffixes mlp.up]
analog metrics --dir DIR          # the default set (see --metrics); writes under analysis_results/
analog metrics --list-metrics
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Any, Dict, List

_TRANSITION_FLAGS = ("rules", "relative_threshold", "z_threshold", "penalty", "min_jump")

__all__ = ["ALIASES", "DEFAULT_METRICS", "add_parser", "quick_config", "run"]

#: what ``analog metrics --dir DIR`` computes when neither --metrics nor --config is given:
#: scale (Frobenius and spectral norm), shape of the spectrum (effective rank) and of the
#: entry distribution (entropy, variance, kurtosis), per layer and for the whole model.
DEFAULT_METRICS = ("weight_norm", "spectral", "effective_rank", "entropy", "variance", "kurtosis")

#: quick names (Phase-Viz's among them) -> (registered metric, settings)
ALIASES: Dict[str, tuple] = {
    "l2": ("norm", {"norm_type": "frobenius"}),
    "weight_norm": ("norm", {"norm_type": "frobenius"}),
    "frobenius": ("norm", {"norm_type": "frobenius"}),
    "spectral": ("norm", {"norm_type": "spectral"}),
    "nuclear": ("norm", {"norm_type": "nuclear"}),
    "max_abs": ("norm", {"norm_type": "max"}),
    "condition": ("condition_number", {}),
    "rank": ("effective_rank", {}),
    "participation": ("participation_ratio", {}),
    "skew": ("skewness", {}),
    "dead_neurons": ("sparsity", {"threshold": 1e-6}),
    "alpha": ("power_law_alpha", {}),
    "cka_debiased": ("cka", {"debiased": True}),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "metrics",
        help="metrics of weights, gradients and activations across checkpoints",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML analysis config (pico-analyze schema)")
    p.add_argument("--run-path", "--dir", dest="run_path", help="directory of checkpoints (or a pico-train run)")
    p.add_argument(
        "--metrics",
        help="quick form: comma-separated metric names (see --list-metrics; default: %s)" % ",".join(DEFAULT_METRICS),
    )
    p.add_argument("--name", default="checkpoint_metrics", help="quick form: analysis name (output sub-folder)")
    p.add_argument("--data-type", default="weights", choices=("weights", "gradients", "activations"))
    p.add_argument("--data-split", default="val", help="split of pico-train learning-dynamics files")
    p.add_argument("--layer-suffixes", help="quick form: comma-separated layer suffixes (default: every tensor)")
    p.add_argument("--steps", help="quick form: comma-separated steps (default: all)")
    p.add_argument("--target-step", type=int, help="quick form: target checkpoint of comparative metrics")
    p.add_argument("--output-dir", help="override monitoring.output_dir (default analysis_results/; "
                   "files go to OUTPUT_DIR/NAME/)")
    p.add_argument(
        "--no-whole-model",
        dest="whole_model",
        action="store_false",
        help="quick form: per-layer values only (no value over all selected tensors at once)",
    )
    p.add_argument(
        "--custom-metrics",
        action="append",
        default=[],
        metavar="FILE.py",
        help="load @register_metric classes and *_of_model(model) functions (repeatable)",
    )
    p.add_argument("--model", help="Python file defining the model class (for metrics that run the model)")
    p.add_argument("--class-name", help="model class name in --model (inferred if the file defines one)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let torch.load run pickled code (weights_only=False); only for trusted files",
    )
    p.add_argument(
        "--transition-rules",
        dest="rules",
        help="comma-separated phase-transition rules: changepoint (default), relative (Phase-Viz), robust",
    )
    p.add_argument("--penalty", type=float, help="changepoint: penalty per boundary in noise units (default 8)")
    p.add_argument("--min-jump", type=float, help="changepoint: smallest jump, fraction of the range (default 0.1)")
    p.add_argument("--relative-threshold", type=float, help="relative-change transition threshold (default 0.2)")
    p.add_argument("--z-threshold", type=float, help="robust z-score transition threshold (default 3.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--list-metrics", action="store_true", help="list metrics, aliases and components, then exit")
    p.set_defaults(func=run)
    return p


def quick_config(args: argparse.Namespace, custom: List[str]) -> Dict[str, Any]:
    """Build a config mapping from the quick form's flags."""
    from .registry import METRICS

    names = [n.strip() for n in (args.metrics or "").split(",") if n.strip()]
    names += [n for n in custom if n not in names and METRICS.get(n).kind == "model"]
    component: Dict[str, Any] = {"component_name": "simple", "data_type": args.data_type}
    if args.layer_suffixes:
        component["layer_suffixes"] = [s.strip() for s in args.layer_suffixes.split(",") if s.strip()]
    entries = []
    for name in names:
        metric_name, settings = ALIASES.get(name, (name, {}))
        entry: Dict[str, Any] = {"metric_name": metric_name, "data_split": args.data_split, "name": name, **settings}
        if not getattr(args, "whole_model", True):
            entry["whole_model"] = False
        if metric_name in METRICS and METRICS.get(metric_name).kind == "comparative":
            if args.target_step is None:
                raise ValueError(f"metric '{name}' compares checkpoints: pass --target-step N")
            entry["target_checkpoint"] = args.target_step
        if not (metric_name in METRICS and METRICS.get(metric_name).kind == "model"):
            entry["components"] = [component]
        entries.append(entry)
    config: Dict[str, Any] = {"analysis_name": args.name, "metrics": entries}
    if args.steps:
        config["steps"] = [int(s) for s in args.steps.split(",") if s.strip()]
    return config


def _list_metrics() -> int:
    from . import COMPONENTS, METRICS

    for name in METRICS.names():
        cls = METRICS.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:22s} [{cls.kind}] {doc}")
    print("\naliases: " + ", ".join(f"{a}={m}{s or ''}" for a, (m, s) in ALIASES.items()))
    print("components: " + ", ".join(COMPONENTS.names()))
    return 0


def _execute(args: argparse.Namespace) -> int:
    from . import load_custom_metrics
    from .config import load_metrics_config, parse_config, parse_transitions
    from .runner import ModelSpec, run_metrics

    custom: List[str] = []
    for path in args.custom_metrics:
        custom += load_custom_metrics(path)
    if args.list_metrics:
        return _list_metrics()
    if not args.run_path:
        raise ValueError("pass --run-path DIR (or --dir DIR)")
    if args.config and args.metrics:
        raise ValueError("use either --config or --metrics, not both")
    if args.config:
        config = load_metrics_config(args.config)
    else:
        if not args.metrics and not custom:
            args.metrics = ",".join(DEFAULT_METRICS)
            if not args.quiet:
                print(f"analog metrics: no --metrics or --config given; computing {args.metrics}", file=sys.stderr)
        config = parse_config(quick_config(args, custom))
    overrides = {k: getattr(args, k) for k in _TRANSITION_FLAGS if getattr(args, k) is not None}
    if overrides:
        if "rules" in overrides:
            overrides["rules"] = [r.strip() for r in overrides["rules"].split(",") if r.strip()]
        spec = {**asdict(config.transitions), **overrides}
        config = replace(config, transitions=parse_transitions(spec))
    model = ModelSpec(args.model, args.class_name) if args.model else None
    paths = run_metrics(
        config, args.run_path, output_dir=args.output_dir, allow_pickle=args.allow_pickle, model=model, quiet=args.quiet
    )
    if not args.quiet:
        print(f"wrote {paths['metrics']}, {paths['transitions']} and {paths['report']}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``analog metrics``; returns 0, or 2 with a one-line error on bad input."""
    from analog.checkpoints import CheckpointError

    from .base import MetricInputError

    try:
        return _execute(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError, CheckpointError, MetricInputError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"analog metrics: error: {message}", file=sys.stderr)
        return 2
