"""Compare parsed training runs: a table, plots, a text report and a JSON file of the data."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, Union

from analog.runs.log_parser import LogParser, parse_training_log
from analog.runs.plots import (
    check_smoothing,
    paired,
    plot_loss_comparison,
    plot_ppl_comparison,
    plot_throughput_comparison,
    plot_training_curves,
    require_matplotlib,
    x_values,
)
from analog.runs.training_metrics import STEP_SERIES, TrainingMetrics

GENERIC_STEMS = {"train", "training", "log", "logs", "trainer_state", "metrics", "output", "stdout", "run"}
COLUMNS = [
    ("Run", "name", "s"),
    ("Config", "config", "s"),
    ("Mode", "mode", "s"),
    ("Steps", "num_steps", "d"),
    ("Tokens", "total_tokens", "tokens"),
    ("Final loss", "final_loss", ".4f"),
    ("Min loss", "min_loss", ".4f"),
    ("Loss@common", "loss_at_common", ".4f"),
    ("Final PPL", "final_ppl", ".2f"),
    ("Best val loss", "best_val_loss", ".4f"),
    ("Best val PPL", "best_val_ppl", ".2f"),
    ("Tok/s", "mean_tok_per_sec", ".0f"),
    ("Grad norm", "mean_grad_norm", ".2f"),
    ("Malformed", "malformed_lines", "d"),
]


def run_name(path: Union[str, os.PathLike]) -> str:
    """A run's default name: the file stem, or the folder's name for stems like ``train``; a Hugging
    Face ``checkpoint-N`` folder stands for its output directory, whose name is used instead."""
    path = Path(path)
    if path.is_dir():
        name_of = path
    elif path.stem.lower() in GENERIC_STEMS and path.parent.name:
        name_of = path.parent
    else:
        return path.stem
    if re.fullmatch(r"checkpoint-\d+", name_of.name) and name_of.parent.name:
        return name_of.parent.name
    return name_of.name


def config_text(config: Mapping[str, Any]) -> str:
    """The table's Config cell: ``dim/layers/heads`` as the seed shows it, else ``k=v k=v``."""
    shown = {k: v for k, v in config.items() if k != "mode"}
    if not shown:
        return "-"
    if {"dim", "layers", "heads"} <= set(shown) and len(shown) == 3:
        return f"{shown['dim']}/{shown['layers']}/{shown['heads']}"
    return " ".join(f"{k}={v}" for k, v in shown.items())


def key_findings(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """The seed's KEY FINDINGS lines (two runs or more): the run with the lowest best validation
    perplexity, and throughput as fastest/slowest mean tokens per second; plus the lowest loss at
    the common step. Runs without the value are left out of that line."""
    if len(rows) < 2:
        return []
    lines = []

    def present(key):
        return [(row["name"], row[key]) for row in rows if row.get(key) is not None and math.isfinite(row[key])]

    val_ppl = present("best_val_ppl")
    if val_ppl:
        name, value = min(val_ppl, key=lambda item: item[1])
        lines.append(f"  - Best val PPL: {name} ({value:.2f})")
    speed = present("mean_tok_per_sec")
    if len(speed) >= 2:
        (fast, fast_v), (slow, slow_v) = max(speed, key=lambda i: i[1]), min(speed, key=lambda i: i[1])
        if fast_v == slow_v:  # max and min would name the same run ("A is 1.00x faster than A")
            lines.append(f"  - Throughput: equal across runs ({fast_v:.0f} tok/s)")
        elif slow_v > 0:
            lines.append(f"  - Throughput: {fast} is {fast_v / slow_v:.2f}x faster than {slow}")
    common = present("loss_at_common")
    if len(common) >= 2:
        name, value = min(common, key=lambda item: item[1])
        lines.append(f"  - Lowest loss at the common point: {name} ({value:.4f})")
    return lines


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"


def _format(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if spec == "tokens":
        for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.2f}{unit}"
        return f"{value:.0f}"
    return format(int(value) if spec == "d" else value, spec)


def _json_values(values: Sequence[float]) -> List[Optional[float]]:
    """NaN/inf are not JSON: they become null."""
    return [v if isinstance(v, int) or math.isfinite(v) else None for v in values]


class RunComparator:
    """Collects runs (``add_run``) and compares them at equal steps or equal tokens (``align``).

    Curves are drawn raw, or smoothed by ``smooth_window=N`` (the seed's trailing N-point moving
    average, ``plots.moving_average``) or ``smoothing=w`` (exponential moving average, ``plots.smooth``);
    tables and JSON always use the raw values.
    """

    def __init__(self, align: str = "step", smoothing: float = 0.0, smooth_window: int = 1):
        x_values(TrainingMetrics(), align)
        check_smoothing(smoothing, smooth_window)
        self.align = align
        self.smoothing = smoothing
        self.smooth_window = smooth_window
        self.runs: Dict[str, TrainingMetrics] = {}

    def add_run(
        self,
        name: Optional[str],
        source: Union[str, os.PathLike, TrainingMetrics],
        parser_cls: Optional[Type[LogParser]] = None,
    ) -> "RunComparator":
        """Add a run from a log path (parsed with ``parse_training_log``) or parsed metrics."""
        metrics = source if isinstance(source, TrainingMetrics) else parse_training_log(source, parser_cls)
        if not name:
            base = name = run_name(metrics.source or "run")
            count = 1
            while name in self.runs:
                count += 1
                name = f"{base}_{count}"
        if name in self.runs:
            raise ValueError(f"a run named {name!r} was already added")
        self.runs[name] = metrics
        return self

    def _check(self) -> None:
        if not self.runs:
            raise ValueError("no runs to compare: add_run() first")
        if self.align == "tokens":
            missing = [name for name, m in self.runs.items() if not m.has("tokens")]
            if missing:
                raise ValueError(f"runs without token counts cannot be aligned by tokens: {missing}")

    def common_x(self) -> Optional[float]:
        """The furthest step (or token count) every run's training loss reaches."""
        ends = []
        for metrics in self.runs.values():
            xs, _ = paired(x_values(metrics, self.align), metrics.loss)
            if not xs:
                return None
            ends.append(max(xs))
        return min(ends) if ends else None

    def loss_at(self, name: str, x: Optional[float]) -> Optional[float]:
        """Training loss of run ``name`` at its last point with abscissa ≤ x."""
        if x is None:
            return None
        points = [(px, py) for px, py in zip(*paired(x_values(self.runs[name], self.align), self.runs[name].loss))]
        before = [py for px, py in points if px <= x]
        return before[-1] if before else None

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per run: its summary, plus ``loss_at_common``."""
        self._check()
        common = self.common_x()
        return [
            {
                "name": name,
                "config": config_text(metrics.config),
                "mode": metrics.config.get("mode", "-"),
                **metrics.summary(),
                "loss_at_common": self.loss_at(name, common),
            }
            for name, metrics in self.runs.items()
        ]

    def format_table(self) -> str:
        rows = self.rows()
        cells = [[title for title, _, _ in COLUMNS]]
        cells += [[_format(row[key], spec) for _, key, spec in COLUMNS] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * width for width in widths))
        common = self.common_x()
        lines.append("")
        shown = _format(common, "tokens" if self.align == "tokens" else "d")
        lines.append(f"Loss@common: training loss at {self.align} {shown}, the last one all runs reach.")
        findings = key_findings(rows)
        if findings:
            lines += ["", "KEY FINDINGS:", *findings]
        return "\n".join(lines)

    def print_comparison_table(self, file=None) -> None:
        print(self.format_table(), file=file or sys.stdout)

    def to_dict(self) -> Dict[str, Any]:
        """Everything parsed, as JSON-ready data (NaN -> null)."""
        self._check()
        common = self.common_x()
        runs = {}
        for name, m in self.runs.items():
            series = {"steps": list(m.steps), **{s: _json_values(getattr(m, s)) for s in STEP_SERIES}}
            series["extras"] = {key: _json_values(values) for key, values in m.extras.items()}
            runs[name] = {
                "source": m.source,
                "format": m.format,
                "config": dict(m.config),
                "summary": m.summary(),
                "loss_at_common": self.loss_at(name, common),
                "lines_read": m.lines_read,
                "malformed_lines": m.malformed_lines,
                "malformed_examples": list(m.malformed_examples),
                "series": series,
                "validation": {
                    "steps": list(m.val_steps),
                    "tokens": _json_values(m.val_tokens),
                    "loss": _json_values(m.val_loss),
                    "ppl": _json_values(m.val_ppl),
                    "gap": _json_values(m.val_gap),
                },
            }
        return {
            "align": self.align,
            "smoothing": self.smoothing,
            "smooth_window": self.smooth_window,
            "common_x": common,
            "runs": runs,
        }

    def report_text(self) -> str:
        smoothing = f"smoothing {self.smoothing}" if self.smoothing else f"smooth window {self.smooth_window}"
        lines = [f"Run comparison (aligned by {self.align}, {smoothing})", "", self.format_table(), ""]
        for name, m in self.runs.items():
            resumed = f", {m.resumed_records} records replaced by a resume" if m.resumed_records else ""
            lines.append(
                f"{name}: {m.source} [{m.format}] {m.lines_read} lines, {m.malformed_lines} malformed{resumed}"
            )
            lines.extend(f"    {example}" for example in m.malformed_examples)
        return "\n".join(lines) + "\n"

    def generate_comparison(
        self, output_dir: Union[str, os.PathLike], smooth_window: Optional[int] = None
    ) -> Dict[str, str]:
        """Write the plots, ``comparison_report.txt`` and ``comparison_data.json``; returns their paths.
        ``smooth_window`` (as the seed's) replaces the comparator's for this call."""
        self._check()
        if smooth_window is not None:
            check_smoothing(self.smoothing, smooth_window)
            self.smooth_window = smooth_window
        require_matplotlib()  # before the folder is made: no empty output folder when it is missing
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        kw = {"align": self.align, "smoothing": self.smoothing, "smooth_window": self.smooth_window}
        files = {
            name: str(out / f"{name}.png") for name in ("loss_comparison", "ppl_comparison", "throughput_comparison")
        }
        plot_loss_comparison(self.runs, title="Training Loss Comparison", output_path=files["loss_comparison"], **kw)
        plot_ppl_comparison(self.runs, title="Perplexity Comparison", output_path=files["ppl_comparison"], **kw)
        plot_throughput_comparison(
            self.runs, title="Training Throughput Comparison", output_path=files["throughput_comparison"], **kw
        )
        used = set()
        for name, metrics in self.runs.items():
            stem = file_safe(name)
            while stem in used:
                stem += "_"
            used.add(stem)
            files[f"curves_{name}"] = str(out / f"curves_{stem}.png")
            plot_training_curves(metrics, files[f"curves_{name}"], name, title=f"Training Curves: {name}", **kw)
        (out / "comparison_report.txt").write_text(self.report_text(), encoding="utf-8")
        with open(out / "comparison_data.json", "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
        files["comparison_report"] = str(out / "comparison_report.txt")
        files["comparison_data"] = str(out / "comparison_data.json")
        return files


def compare_runs(
    runs: Union[Mapping[str, Any], Sequence[Any]],
    output_dir: Union[str, os.PathLike],
    align: str = "step",
    smoothing: float = 0.0,
    print_table: bool = True,
    smooth_window: int = 1,
) -> RunComparator:
    """Parse ``runs`` ({name: log path or TrainingMetrics}, or a list of paths), print the table
    and write every comparison file to ``output_dir``. Returns the comparator."""
    comparator = RunComparator(align=align, smoothing=smoothing, smooth_window=smooth_window)
    items = runs.items() if isinstance(runs, Mapping) else [(None, source) for source in runs]
    for name, source in items:
        comparator.add_run(name, source)
    if print_table:
        comparator.print_comparison_table()
    comparator.generate_comparison(output_dir)
    return comparator
