"""Change-point detection for one metric series: the default, quiet phase-transition rule.

The series ``v_0..v_T`` at steps ``s_0 < ... < s_T`` is fitted by straight lines in ``s`` on
contiguous segments (each line free, so a segment boundary may be a jump), choosing the boundaries
by exact optimal partitioning (Jackson et al. 2005) that minimises

    sum_segments SSE(least-squares line on the segment) + beta * (number of boundaries),

with every segment at least 2 checkpoints long. Values are scaled to the series range
``R = max v - min v`` and steps to ``[0, 1]`` first, so the rule does not depend on units.

* Noise: ``sigma = max(sigma_hat, 0.02)`` in range units. ``sigma_hat`` is the smaller of two robust
  scales (1.4826 * median absolute deviation), both equal to the noise level for white noise on a
  line: of the second differences ``e_i = v_i - ((1-w_i) v_{i-1} + w_i v_{i+1})``,
  ``w_i = (s_i - s_{i-1}) / (s_{i+1} - s_{i-1})``, each divided by ``sqrt(1 + w_i^2 + (1-w_i)^2)``;
  and of the detrended first differences ``(r_i - median r) (s_i - s_{i-1})`` (``r_i`` the rates),
  divided by ``sqrt(2)``. A jump spoils two second differences but one first difference, which
  matters on short runs. The floor keeps a noiseless series from turning every bend into a boundary.
* Penalty ``beta = penalty * sigma^2 * ln(n)`` (``penalty`` 8 by default; BIC would be about 3).
* A boundary between checkpoints ``i-1`` and ``i`` is reported only as a **jump**: the two fitted
  lines, evaluated half-way between ``s_{i-1}`` and ``s_i``, differ by ``J >= max(min_jump, 4 sigma)``
  (``min_jump`` 0.1, i.e. 10% of the range). A smooth bend (an exponential decay's knee, the start of
  a square root) is fitted by lines that meet, so it is not reported; a level shift or a change
  faster than the checkpoints resolve is.
* Two reported boundaries at most 2 checkpoints apart (a transition spread over 2 checkpoints) are
  merged into one, from the first boundary's previous step to the second's step (pairs only).

``score`` is ``J / sigma`` (the jump in noise units). Needs 5 checkpoints; the first reportable
step is ``s_2`` (one checkpoint alone cannot tell a transition from the initial transient).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

__all__ = ["changepoint_segments", "noise_scale"]

MIN_SIZE = 2
NOISE_FLOOR = 0.02
JUMP_Z = 4.0


def noise_scale(s: np.ndarray, v: np.ndarray) -> float:
    """Robust noise scale: the smaller of two estimates, each robust to a few jumps (module docstring)."""
    if v.size < 3:
        return 0.0
    w = (s[1:-1] - s[:-2]) / (s[2:] - s[:-2])
    e = (v[1:-1] - ((1 - w) * v[:-2] + w * v[2:])) / np.sqrt(1 + w**2 + (1 - w) ** 2)
    ds = np.diff(s)
    rates = np.diff(v) / ds
    d = (rates - np.median(rates)) * ds
    first = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0)
    return float(min(1.4826 * np.median(np.abs(e)), first))


class _Sums:
    """Prefix sums of ``x, y, x^2, xy, y^2``: a segment's least-squares line and SSE in O(1)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.c = [np.concatenate([[0.0], np.cumsum(a)]) for a in (x, y, x * x, x * y, y * y)]

    def moments(self, a, b):
        n = b - a
        sx, sy, sxx, sxy, syy = (c[b] - c[a] for c in self.c)
        return n, sx / n, sy / n, sxx - sx * sx / n, sxy - sx * sy / n, syy - sy * sy / n

    def sse(self, a: np.ndarray, b: int) -> np.ndarray:
        _, _, _, vx, cxy, vy = self.moments(a, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            explained = np.where(vx > 1e-300, cxy * cxy / np.where(vx > 1e-300, vx, 1.0), 0.0)
        return np.maximum(vy - explained, 0.0)

    def line(self, a: int, b: int) -> Tuple[float, float]:
        _, mx, my, vx, cxy, _ = self.moments(a, b)
        slope = cxy / vx if vx > 1e-300 else 0.0
        return float(slope), float(my - slope * mx)


def _partition(sums: _Sums, n: int, beta: float) -> List[int]:
    """Optimal partitioning: boundaries ``0 = b_0 < b_1 < ... < b_K = n`` (segments ``[b_j, b_{j+1})``)."""
    best = np.full(n + 1, np.inf)
    best[0] = -beta
    last = np.zeros(n + 1, dtype=int)
    for t in range(MIN_SIZE, n + 1):
        starts = np.arange(0, t - MIN_SIZE + 1)
        starts = starts[(starts == 0) | (starts >= MIN_SIZE)]
        total = best[starts] + sums.sse(starts, t) + beta
        k = int(np.argmin(total))
        best[t], last[t] = total[k], starts[k]
    bounds, t = [n], n
    while t > 0:
        t = int(last[t])
        bounds.append(t)
    return bounds[::-1]


def changepoint_segments(steps, values, penalty: float = 8.0, min_jump: float = 0.1) -> List[Tuple[int, int, float]]:
    """``(first, last, score)`` index pairs of the jumps found: the transition goes from checkpoint
    ``first - 1`` to checkpoint ``last`` (``first == last`` for a jump between two checkpoints).

    ``steps`` must be strictly increasing and ``values`` finite (see :func:`analog.metrics.transitions._clean`).
    """
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    n = v.size
    spread = float(v.max() - v.min()) if n else 0.0
    if n < 2 * MIN_SIZE + 1 or spread == 0 or not np.isfinite(spread):
        return []
    x = (s - s[0]) / (s[-1] - s[0])
    y = (v - v.mean()) / spread
    sigma = max(noise_scale(x, y), NOISE_FLOOR)
    sums = _Sums(x, y)
    bounds = _partition(sums, n, penalty * sigma * sigma * np.log(n))
    jumps = []
    for j in range(1, len(bounds) - 1):
        left, cut, right = bounds[j - 1], bounds[j], bounds[j + 1]
        (sl, il), (sr, ir) = sums.line(left, cut), sums.line(cut, right)
        mid = 0.5 * (x[cut - 1] + x[cut])
        jump = abs((sr * mid + ir) - (sl * mid + il))
        if jump >= max(min_jump, JUMP_Z * sigma):
            jumps.append((cut, jump / sigma))
    merged: List[Tuple[int, int, float]] = []
    for cut, score in jumps:
        if merged and merged[-1][0] == merged[-1][1] and cut - merged[-1][1] <= MIN_SIZE:
            first, _, best = merged.pop()
            merged.append((first, cut, max(best, score)))
        else:
            merged.append((cut, cut, score))
    return merged
