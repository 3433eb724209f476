"""Phase-transition detection on one metric series ``v_0..v_T`` at real steps ``s_0 < ... < s_T``.

* ``changepoint`` (default): jumps found by a penalised piecewise-linear change-point fit, quiet
  on noise and on smooth bends; see :mod:`analog.metrics.changepoint`. A transition spread over
  two checkpoints is reported once, from ``previous_step`` to ``step``.

Two simpler rules, both reporting the later step ``s_i`` of a flagged pair ``(s_{i-1}, s_i)``:

* ``relative`` (Phase-Viz): ``|v_i - v_{i-1}| / max(|v_{i-1}|, eps) > threshold`` (default 0.2).
  Simple, but any series that crosses zero or is noisy is flagged often.
* ``robust``: rates ``r_i = (v_i - v_{i-1}) / (s_i - s_{i-1})`` (so uneven checkpoint spacing is
  accounted for), then the modified z-score of Iglewicz & Hoaglin
  ``z_i = 0.6745 (r_i - median(r)) / MAD(r)``, ``MAD = median |r - median(r)|``; flagged when
  ``|z_i| > z_threshold`` (default 3.5). When ``MAD = 0`` the mean absolute deviation times
  1.2533 is used; when that is 0 too, the rates are all equal and nothing is flagged.
  Needs at least 4 rates (5 checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from .changepoint import changepoint_segments

__all__ = [
    "Transition",
    "changepoint_transitions",
    "detect_transitions",
    "relative_change_transitions",
    "robust_transitions",
]

EPS = 1e-12


@dataclass(frozen=True)
class Transition:
    step: int
    previous_step: int
    value: float
    previous_value: float
    rule: str
    score: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def _clean(steps: Sequence[int], values: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.shape != v.shape:
        raise ValueError(f"steps and values differ in length ({s.size} vs {v.size})")
    keep = np.isfinite(v)
    s, v = s[keep], v[keep]
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if np.any(np.diff(s) == 0):
        raise ValueError("repeated step in a metric series")
    return s, v


def relative_change_transitions(steps, values, threshold: float = 0.2) -> List[Transition]:
    """Pairs whose relative change ``|v_i - v_{i-1}| / max(|v_{i-1}|, 1e-12)`` exceeds ``threshold``."""
    s, v = _clean(steps, values)
    out = []
    for i in range(1, v.size):
        score = abs(v[i] - v[i - 1]) / max(abs(v[i - 1]), EPS)
        if score > threshold:
            out.append(Transition(int(s[i]), int(s[i - 1]), float(v[i]), float(v[i - 1]), "relative", float(score)))
    return out


def robust_transitions(steps, values, z_threshold: float = 3.5) -> List[Transition]:
    """Pairs whose per-step rate of change is an outlier by the modified z-score (median/MAD)."""
    s, v = _clean(steps, values)
    if v.size < 5:
        return []
    rates = np.diff(v) / np.diff(s)
    center = np.median(rates)
    spread = np.median(np.abs(rates - center))
    if spread == 0:
        mean_dev = np.mean(np.abs(rates - center))
        if mean_dev == 0:
            return []
        z = (rates - center) / (1.253314 * mean_dev)
    else:
        z = 0.6745 * (rates - center) / spread
    out = []
    for i in np.nonzero(np.abs(z) > z_threshold)[0]:
        out.append(Transition(int(s[i + 1]), int(s[i]), float(v[i + 1]), float(v[i]), "robust", float(z[i])))
    return out


def changepoint_transitions(steps, values, penalty: float = 8.0, min_jump: float = 0.1) -> List[Transition]:
    """Jumps of a penalised piecewise-linear fit (:func:`analog.metrics.changepoint.changepoint_segments`)."""
    s, v = _clean(steps, values)
    out = []
    for first, last, score in changepoint_segments(s, v, penalty, min_jump):
        out.append(
            Transition(int(s[last]), int(s[first - 1]), float(v[last]), float(v[first - 1]), "changepoint", score)
        )
    return out


def detect_transitions(
    series: Iterable[Tuple[Tuple[str, str, str], Sequence[int], Sequence[float]]],
    rules: Sequence[str] = ("changepoint",),
    relative_threshold: float = 0.2,
    z_threshold: float = 3.5,
    penalty: float = 8.0,
    min_jump: float = 0.1,
) -> List[Dict[str, object]]:
    """Run the chosen rules on every ``((metric, component, layer), steps, values)`` series."""
    found: List[Dict[str, object]] = []
    for (metric, component, layer), steps, values in series:
        hits: List[Transition] = []
        if "changepoint" in rules:
            hits += changepoint_transitions(steps, values, penalty, min_jump)
        if "relative" in rules:
            hits += relative_change_transitions(steps, values, relative_threshold)
        if "robust" in rules:
            hits += robust_transitions(steps, values, z_threshold)
        for hit in hits:
            record = {"metric": metric, "component": component, "layer": layer, **hit.to_dict()}
            record["score"] = None if math.isinf(hit.score) else hit.score
            found.append(record)
    return found
