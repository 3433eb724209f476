"""A self-contained HTML page for influence results on image data.

Images are drawn as inline SVG (one rect per pixel, grey levels), so the page needs no network
and no image files. Every text that comes from data (ids, labels) is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.row{display:flex;align-items:flex-start;gap:18px;margin:10px 0 18px}
.group{display:flex;gap:6px;flex-wrap:wrap}
figure{margin:0;text-align:center;font-size:11px}
figcaption{max-width:80px;word-break:break-word}
.label{font-weight:600;font-size:12px;color:#555;width:70px}
.flip{outline:3px solid #d33}
"""


def svg_image(pixels: np.ndarray, size: int = 64) -> str:
    """An (h, w) array in [0, 1] as an inline SVG, dark = high."""
    h, w = pixels.shape
    cell = size / max(h, w)
    rects = []
    for i in range(h):
        for j in range(w):
            level = int(255 * (1 - float(np.clip(pixels[i, j], 0, 1))))
            rects.append(f'<rect x="{j * cell:.2f}" y="{i * cell:.2f}" width="{cell:.2f}" height="{cell:.2f}" '
                         f'fill="rgb({level},{level},{level})"/>')
    return f'<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}">{"".join(rects)}</svg>'


def _figure(pixels, caption: str, flagged: bool = False) -> str:
    cls = ' class="flip"' if flagged else ""
    return f"<figure{cls}>{svg_image(pixels)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def influence_page(
    path,
    title: str,
    queries: List[Dict[str, Any]],
    flagged: Sequence[Dict[str, Any]],
    summary: str,
) -> Path:
    """Write the page.

    ``queries``: dicts with ``image``, ``caption``, and ``helpful`` / ``harmful`` lists of dicts with
    ``image``, ``caption``, ``flipped``. ``flagged``: dicts with ``image``, ``caption``, ``flipped``
    for the training examples of highest self-influence.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(summary)}</p>",
             "<p>Red outline: a training example whose label was flipped on purpose.</p>",
             "<h2>Queries and their most influential training examples</h2>"]
    for q in queries:
        parts.append("<div class='row'>" + _figure(q["image"], q["caption"]))
        for kind in ("helpful", "harmful"):
            items = "".join(_figure(t["image"], t["caption"], t["flipped"]) for t in q[kind])
            parts.append(f"<div><div class='label'>{kind}</div><div class='group'>{items}</div></div>")
        parts.append("</div>")
    parts.append("<h2>Training examples flagged by self-influence (highest first)</h2><div class='group'>")
    parts.extend(_figure(t["image"], t["caption"], t["flipped"]) for t in flagged)
    parts.append("</div></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path
