"""Writing results: ``step_{N}/{metric}_{split}.json``, ``metrics.csv``, ``transitions.json``, ``report.html``."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

from .config import TransitionConfig
from .transitions import detect_transitions

__all__ = ["ResultWriter", "Row"]


class Row(NamedTuple):
    """One value of the tidy table ``metrics.csv``."""

    step: int
    metric: str
    component: str
    layer: str
    value: float


def _json_value(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class ResultWriter:
    """Collects rows step by step and writes every output under ``out_dir``."""

    def __init__(self, out_dir: Path, config: Dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: List[Row] = []
        (self.out_dir / "analysis_config.json").write_text(json.dumps(config, indent=2, default=str))

    def write_step(self, step: int, results: Dict[tuple, List[Row]]) -> None:
        """``results[(label, split)]`` holds that entry's rows at ``step``; one JSON file each.

        The JSON maps layer name -> value as pico-analyze writes it (non-finite values as null).
        """
        step_dir = self.out_dir / f"step_{step}"
        step_dir.mkdir(exist_ok=True)
        for (label, split), rows in results.items():
            payload = {row.layer: _json_value(row.value) for row in rows}
            (step_dir / f"{label}_{split}.json").write_text(json.dumps(payload, indent=1))
            self.rows.extend(rows)

    def series(self):
        """``((metric, component, layer), steps, values)`` for every series, steps ascending."""
        grouped = defaultdict(list)
        for row in self.rows:
            grouped[(row.metric, row.component, row.layer)].append((row.step, row.value))
        for key, points in grouped.items():
            points.sort()
            yield key, [p[0] for p in points], [p[1] for p in points]

    def finish(self, transitions: TransitionConfig, title: str) -> Dict[str, Path]:
        """Write ``metrics.csv``, ``transitions.json`` and ``report.html``; return their paths."""
        paths = {name: self.out_dir / name for name in ("metrics.csv", "transitions.json", "report.html")}
        with open(paths["metrics.csv"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(Row._fields)
            writer.writerows(sorted(self.rows, key=lambda r: (r.metric, r.component, r.layer, r.step)))
        settings = asdict(transitions)
        settings["rules"] = list(transitions.rules)
        found = detect_transitions(self.series(), **settings)
        paths["transitions.json"].write_text(json.dumps({"settings": settings, "transitions": found}, indent=1))
        from analog.report.metrics_page import write_metrics_page

        write_metrics_page(paths["report.html"], [r._asdict() for r in self.rows], found, title=title)
        return paths
