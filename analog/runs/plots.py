"""Plots of parsed runs, drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

Every figure has a fixed size: comparison plots are ``COMPARISON_SIZE`` inches at ``DPI``
(1000 x 600 pixels), per-run curves ``CURVES_SIZE`` (1500 x 900 pixels).
"""

from __future__ import annotations

import math
import os
from typing import List, Mapping, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analog.runs.training_metrics import TrainingMetrics

DPI = 100
COMPARISON_SIZE = (10, 6)
CURVES_SIZE = (15, 9)
ALIGN_LABELS = {"step": "step", "tokens": "tokens"}


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """Exponential moving average s_i = w·s_{i−1} + (1 − w)·x_i, debiased by 1 − w^k after k
    finite values (as TensorBoard); NaN inputs stay NaN and do not move the average. w = 0: as is."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    if weight == 0.0:
        return list(values)
    out, average, count = [], 0.0, 0
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(float("nan"))
            continue
        count += 1
        average = weight * average + (1.0 - weight) * value
        out.append(average / (1.0 - weight**count))
    return out


def x_values(metrics: TrainingMetrics, align: str, validation: bool = False) -> List[float]:
    """Abscissae of a run: its steps, or its token counts (``align="tokens"``)."""
    if align not in ALIGN_LABELS:
        raise ValueError(f"align must be one of {sorted(ALIGN_LABELS)}, got {align!r}")
    if align == "step":
        return [float(s) for s in (metrics.val_steps if validation else metrics.steps)]
    return list(metrics.val_tokens if validation else metrics.tokens)


def paired(xs: Sequence[float], ys: Sequence[float]) -> Tuple[List[float], List[float]]:
    """Keep the points where both x and y are finite."""
    keep = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and y is not None and math.isfinite(y)]
    return [x for x, _ in keep], [y for _, y in keep]


def _new_figure(size) -> Figure:
    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _draw(ax, metrics, series, align, smoothing, label, validation=False, log=False, **style) -> int:
    """Plot one series of one run on ``ax``; returns the number of points drawn."""
    xs, ys = paired(x_values(metrics, align, validation), series)
    if not xs:
        return 0
    if validation:
        ax.plot(xs, ys, marker="o", linestyle="--", label=label, **style)
    elif smoothing > 0:
        line = ax.plot(xs, ys, alpha=0.25, **style)[0]
        ax.plot(xs, smooth(ys, smoothing), color=line.get_color(), label=label)
    else:
        ax.plot(xs, ys, label=label, **style)
    if log and all(y > 0 for y in ys):
        ax.set_yscale("log")
    return len(xs)


def _finish(ax, drawn: int, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if drawn:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _comparison(runs, path, pairs, title, ylabel, align, smoothing, log=False) -> str:
    """One figure overlaying ``pairs`` = [(series attr, validation?, label suffix)] for every run."""
    figure = _new_figure(COMPARISON_SIZE)
    ax = figure.add_subplot(1, 1, 1)
    drawn = 0
    for name, metrics in runs.items():
        for attr, validation, suffix in pairs:
            drawn += _draw(ax, metrics, getattr(metrics, attr), align, smoothing, name + suffix, validation, log)
    _finish(ax, drawn, title, ALIGN_LABELS[align], ylabel)
    figure.tight_layout()
    return _save(figure, path)


def plot_loss_comparison(runs: Mapping[str, TrainingMetrics], path, align="step", smoothing=0.0) -> str:
    """Training loss (and validation loss, dashed) of every run."""
    pairs = [("loss", False, ""), ("val_loss", True, " (val)")]
    return _comparison(runs, path, pairs, "Loss", "loss", align, smoothing)


def plot_ppl_comparison(runs: Mapping[str, TrainingMetrics], path, align="step", smoothing=0.0) -> str:
    """Perplexity (log scale), training and validation."""
    pairs = [("ppl", False, ""), ("val_ppl", True, " (val)")]
    return _comparison(runs, path, pairs, "Perplexity", "perplexity", align, smoothing, log=True)


def plot_throughput_comparison(runs: Mapping[str, TrainingMetrics], path, align="step", smoothing=0.0) -> str:
    """Tokens per second of every run."""
    return _comparison(runs, path, [("tok_per_sec", False, "")], "Throughput", "tokens/s", align, smoothing)


def plot_training_curves(metrics: TrainingMetrics, path, name="run", align="step", smoothing=0.0) -> str:
    """Six panels of one run: loss, perplexity, learning rate, gradient norm, throughput, extras."""
    figure = _new_figure(CURVES_SIZE)
    panels = [
        ("Loss", [("loss", False, "train"), ("val_loss", True, "val")], False),
        ("Perplexity", [("ppl", False, "train"), ("val_ppl", True, "val")], True),
        ("Learning rate", [("lr", False, "lr")], False),
        ("Gradient norm", [("grad_norm", False, "grad norm")], False),
        ("Throughput (tokens/s)", [("tok_per_sec", False, "tok/s")], False),
    ]
    xlabel = ALIGN_LABELS[align]
    for index, (title, pairs, log) in enumerate(panels, start=1):
        ax = figure.add_subplot(2, 3, index)
        drawn = sum(
            _draw(ax, metrics, getattr(metrics, attr), align, smoothing, label, validation, log)
            for attr, validation, label in pairs
        )
        _finish(ax, drawn, title, xlabel, "")
    ax = figure.add_subplot(2, 3, 6)
    drawn = sum(_draw(ax, metrics, values, align, smoothing, key) for key, values in metrics.extras.items())
    _finish(ax, drawn, "Other metrics", xlabel, "")
    figure.suptitle(name)
    figure.tight_layout()
    return _save(figure, path)
