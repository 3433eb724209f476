"""Plots of parsed runs, drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

matplotlib is an optional dependency (``pip install "analog-ml[plot]"``); it is imported when the
first figure is drawn, so parsing and tables work without it.

Every figure has a fixed size: comparison plots are ``COMPARISON_SIZE`` inches at ``DPI``
(1000 x 600 pixels), per-run curves ``CURVES_SIZE`` (1500 x 900 pixels). Each plot function
returns the ``matplotlib.figure.Figure`` and saves it when ``output_path`` is given, as the seed's
do. Two smoothings: ``smooth_window=N``, the seed's trailing moving average, and ``smoothing=w``,
an exponential moving average; either is drawn over the faint raw curve.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence, Tuple

from analog.runs.training_metrics import TrainingMetrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MATPLOTLIB_MISSING = 'analog.runs plots need matplotlib, which is not installed: pip install "analog-ml[plot]"'

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


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """The seed's trailing moving average: m_i = (x_{i−N+1} + … + x_i) / N for i ≥ N − 1, so the
    result has len(values) − N + 1 points, drawn at ``steps[N-1:]``; fewer than N values (or
    N = 1) come back as they are. Running sum: linear in the number of values."""
    window = _check_window(window)
    if window == 1 or len(values) < window:
        return list(values)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"smooth_window must be an integer >= 1, got {window!r}")
    return window


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


def require_matplotlib() -> None:
    """Raise ImportError(MATPLOTLIB_MISSING) unless matplotlib's Agg canvas imports: callers that will
    draw check this before doing other work or creating output folders."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise ImportError(MATPLOTLIB_MISSING) from error


def _new_figure(size) -> "Figure":
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: "Figure", path) -> "Figure":
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=DPI, format="png")
    return figure


def check_smoothing(smoothing: float, smooth_window: int) -> Tuple[float, int]:
    """Validate the two smoothings (at most one of them on); returns ``(weight, window)``."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {smoothing}")
    if smoothing > 0 and _check_window(smooth_window) > 1:
        raise ValueError("use either smoothing (EMA weight) or smooth_window (moving average), not both")
    return smoothing, _check_window(smooth_window)


def _draw(ax, metrics, series, align, how, label, validation=False, log=False, **style) -> int:
    """Plot one series of one run on ``ax``; ``how`` = (EMA weight, moving-average window).
    Returns the number of points drawn."""
    xs, ys = paired(x_values(metrics, align, validation), series)
    if not xs:
        return 0
    weight, window = how
    if validation:
        ax.plot(xs, ys, marker="o", linestyle="--", label=label, **style)
    elif weight > 0 or (window > 1 and len(ys) >= window):
        line = ax.plot(xs, ys, alpha=0.25, **style)[0]
        if weight > 0:
            xs_s, ys_s = xs, smooth(ys, weight)
        else:
            xs_s, ys_s = xs[window - 1 :], moving_average(ys, window)
        ax.plot(xs_s, ys_s, color=line.get_color(), label=label)
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


def _comparison(runs, path, pairs, title, ylabel, align, how, log=False) -> "Figure":
    """One figure overlaying ``pairs`` = [(series attr, validation?, label suffix)] for every run."""
    figure = _new_figure(COMPARISON_SIZE)
    ax = figure.add_subplot(1, 1, 1)
    drawn = 0
    for name, metrics in runs.items():
        for attr, validation, suffix in pairs:
            drawn += _draw(ax, metrics, getattr(metrics, attr), align, how, name + suffix, validation, log)
    _finish(ax, drawn, title, ALIGN_LABELS[align], ylabel)
    figure.tight_layout()
    return _save(figure, path)


def plot_loss_comparison(
    runs: Mapping[str, TrainingMetrics],
    output_path=None,
    *,
    title: str = "Loss Comparison",
    align: str = "step",
    smoothing: float = 0.0,
    smooth_window: int = 1,
    include_validation: bool = True,
) -> "Figure":
    """Training loss of every run, validation loss dashed (``include_validation``)."""
    pairs = [("loss", False, " (train)")] + ([("val_loss", True, " (val)")] if include_validation else [])
    return _comparison(runs, output_path, pairs, title, "loss", align, check_smoothing(smoothing, smooth_window))


def plot_ppl_comparison(
    runs: Mapping[str, TrainingMetrics],
    output_path=None,
    *,
    title: str = "Perplexity Comparison",
    align: str = "step",
    smoothing: float = 0.0,
    smooth_window: int = 1,
    log_scale: bool = True,
    include_validation: bool = True,
) -> "Figure":
    """Perplexity (log scale unless ``log_scale=False`` or a value is <= 0), training and validation."""
    pairs = [("ppl", False, " (train)")] + ([("val_ppl", True, " (val)")] if include_validation else [])
    how = check_smoothing(smoothing, smooth_window)
    return _comparison(runs, output_path, pairs, title, "perplexity", align, how, log=log_scale)


def plot_throughput_comparison(
    runs: Mapping[str, TrainingMetrics],
    output_path=None,
    *,
    title: str = "Training Throughput",
    align: str = "step",
    smoothing: float = 0.0,
    smooth_window: int = 1,
) -> "Figure":
    """Tokens per second of every run."""
    how = check_smoothing(smoothing, smooth_window)
    return _comparison(runs, output_path, [("tok_per_sec", False, "")], title, "tokens/s", align, how)


#: the seed's name
plot_throughput = plot_throughput_comparison


def plot_training_curves(
    metrics: TrainingMetrics,
    output_path=None,
    name: str = "run",
    *,
    title: Optional[str] = None,
    align: str = "step",
    smoothing: float = 0.0,
    smooth_window: int = 1,
) -> "Figure":
    """Six panels of one run: loss, perplexity, learning rate, gradient norm, throughput, extras.
    The figure's title is ``title`` (default: the run's ``name``)."""
    how = check_smoothing(smoothing, smooth_window)
    figure = _new_figure(CURVES_SIZE)
    panels = [
        ("Loss", [("loss", False, "train"), ("val_loss", True, "val")], False),
        ("Perplexity", [("ppl", False, "train"), ("val_ppl", True, "val")], True),
        ("Learning rate", [("lr", False, "lr")], False),
        ("Gradient norm", [("grad_norm", False, "grad norm")], False),
        ("Throughput (tokens/s)", [("tok_per_sec", False, "tok/s")], False),
    ]
    xlabel = ALIGN_LABELS[align]
    for index, (panel, pairs, log) in enumerate(panels, start=1):
        ax = figure.add_subplot(2, 3, index)
        drawn = sum(
            _draw(ax, metrics, getattr(metrics, attr), align, how, label, validation, log)
            for attr, validation, label in pairs
        )
        _finish(ax, drawn, panel, xlabel, "")
    ax = figure.add_subplot(2, 3, 6)
    drawn = sum(_draw(ax, metrics, values, align, how, key) for key, values in metrics.extras.items())
    _finish(ax, drawn, "Other metrics", xlabel, "")
    figure.suptitle(title if title is not None else name)
    figure.tight_layout()
    return _save(figure, output_path)
