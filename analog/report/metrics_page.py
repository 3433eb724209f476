"""The checkpoint-metrics report: one self-contained HTML file (inline CSS, JS and data; no CDN).

Data is embedded as JSON inside ``<script type="application/json">`` with ``<``, ``>``, ``&`` and
the line separators written as ``\\uXXXX`` escapes, so no name from a checkpoint can close the
script element; the page inserts names with ``textContent`` only. The element
``#analog-status`` carries ``data-charts`` (charts drawn) and ``data-errors`` (script errors),
which the browser test reads.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Union

__all__ = ["build_metrics_page", "write_metrics_page"]

ASSETS = Path(__file__).parent / "assets"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 960px; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin: 0 0 .4rem; word-break: break-all; }
section.chart { border: 1px solid #ddd; border-radius: 6px; padding: .8rem; margin: 1rem 0; }
canvas.plot { width: 100%; display: block; }
.buttons button, #download-all { margin: .3rem .3rem 0 0; }
ul.legend { list-style: none; padding: 0; margin: .4rem 0; columns: 2; font-size: .85rem; }
ul.legend li { word-break: break-all; }
.swatch { display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem; }
.readout { font-size: .8rem; min-height: 1rem; color: #555; }
.controls select { margin-right: .5rem; max-width: 100%; } #analog-status { font-size: .8rem; color: #777; }
.log-toggle { font-size: .85rem; margin-right: .8rem; }
"""


def _embed_json(payload: Any) -> str:
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _finite(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def build_metrics_page(
    rows: Iterable[Dict[str, Any]], transitions: List[Dict[str, Any]], title: str = "Checkpoint metrics"
) -> str:
    """The report as a string. ``rows`` have keys ``step, metric, component, layer, value``."""
    compact = [[r["step"], str(r["metric"]), str(r["component"]), str(r["layer"]), _finite(r["value"])] for r in rows]
    clean_transitions = [{k: (_finite(v) if isinstance(v, float) else v) for k, v in t.items()} for t in transitions]
    data = _embed_json({"rows": compact, "transitions": clean_transitions})
    script = (ASSETS / "metrics_page.js").read_text(encoding="utf-8").replace("</", "<\\/")
    steps = sorted({r[0] for r in compact})
    summary = (
        f"{len({r[1] for r in compact})} metric(s), {len(steps)} checkpoint(s)"
        + (f" from step {steps[0]} to {steps[-1]}" if steps else "")
        + f", {len(transitions)} transition(s) flagged"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}. Red circles and dashed lines mark phase "
        "transitions (no series is drawn in red). Each chart has a log-scale switch; open the page with "
        "<code>#log</code> to start with every chart on a log scale. Whole-model values (one number per "
        "checkpoint over all selected tensors) have their own chart per metric.</p>"
        '<div id="analog-status" data-charts="0" data-errors="0">loading</div>'
        '<div id="analog-charts"></div>'
        f'<script type="application/json" id="analog-data">{data}</script>'
        f"<script>{script}</script></body></html>\n"
    )


def write_metrics_page(
    path: Union[str, Path],
    rows: Iterable[Dict[str, Any]],
    transitions: List[Dict[str, Any]],
    title: str = "Checkpoint metrics",
) -> Path:
    """Write :func:`build_metrics_page` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(build_metrics_page(rows, transitions, title), encoding="utf-8")
    return path
