"""Keeping every value of a parsed log tied to its step: per-line settling and resumed runs.

**Per line.** A parser (the built-in one, or a subclass in the seed's style that appends straight to
``metrics.steps`` and ``metrics.loss``) may append to any series while reading one line.
:func:`settle` then restores the invariant *every per-step series has one value per step* (and
every validation series one value per validation record):

- values appended on a line that also appended k steps belong to those k steps, in order; a
  series that got fewer than k values gets NaN for the rest, one that got more is an error;
- values appended on a line that appended no step belong to the current (last) step: they
  replace its value (a repeated value for the same step keeps the last).

**Resumed runs.** A run restarted from a checkpoint logs some steps again. Record i is
*superseded* when a later record j has ``step_j <= step_i`` (and not a larger epoch: logs whose
step counter restarts every epoch are not resumes). Superseded records are dropped, so for each
step the last record is kept, and the steps abandoned by the restart go with them. A validation
record is superseded when a training record logged after it has a step ``<=`` its step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from analog.runs.training_metrics import TrainingMetrics

NAN = float("nan")
Mark = Tuple[Dict[str, int], Dict[str, int]]


def _groups(metrics: "TrainingMetrics"):
    """(step list, {series name: list}) for the training and the validation group."""
    from analog.runs.training_metrics import STEP_SERIES, VAL_SERIES

    train = {name: getattr(metrics, name) for name in STEP_SERIES}
    train.update({f"extras[{key}]": values for key, values in metrics.extras.items()})
    return (metrics.steps, train), (metrics.val_steps, {name: getattr(metrics, name) for name in VAL_SERIES})


def mark(metrics: "TrainingMetrics") -> Mark:
    """Lengths of every list before a line is read (``steps``/``val_steps`` under ``""``)."""
    marks = []
    for steps, series in _groups(metrics):
        lengths = {name: len(values) for name, values in series.items()}
        lengths[""] = len(steps)
        marks.append(lengths)
    return marks[0], marks[1]


def settle(metrics: "TrainingMetrics", before: Mark, line_number: int) -> None:
    """Re-align what the last line appended (rules in the module docstring); raises ``ValueError``
    naming the line and the series when values cannot be tied to a step."""
    for (steps, series), lengths in zip(_groups(metrics), before):
        n0, n = lengths[""], len(steps)
        if all(len(values) == n for values in series.values()):
            continue  # every series got exactly one value per new step (or nothing): the rule's result
        for name, values in series.items():
            if name not in lengths and len(values) == n:
                continue  # created on this line already aligned (add_step of a new extra)
            start = lengths.get(name, 0)
            new = values[start:]
            del values[start:]
            values.extend([NAN] * (n0 - len(values)))
            _place(values, new, n0, n, name, line_number)
    metrics.val_after.extend([len(metrics.steps)] * (len(metrics.val_steps) - len(metrics.val_after)))


def _place(values: List[float], new: List[float], n0: int, n: int, name: str, line_number: int) -> None:
    if n > n0:
        if len(new) > n - n0:
            raise ValueError(f"line {line_number}: {len(new)} values of {name} for {n - n0} new step(s)")
        values.extend(new + [NAN] * (n - n0 - len(new)))
    elif new:
        if n == 0:
            raise ValueError(f"line {line_number}: a value of {name} before any step")
        values[n - 1] = new[-1]


def superseded_records(steps: List[int], epochs: List[float]) -> List[bool]:
    """``dropped[i]``: a later record has a step <= ``steps[i]`` and not a larger epoch."""
    later_min: Dict[Optional[float], int] = {}  # epoch (None: unknown) -> min step of later records
    dropped = [False] * len(steps)
    for i in range(len(steps) - 1, -1, -1):
        epoch = _epoch(epochs, i)
        dropped[i] = any(
            step <= steps[i] for key, step in later_min.items() if key is None or epoch is None or key <= epoch
        )
        later_min[epoch] = min(later_min.get(epoch, steps[i]), steps[i])
    return dropped


def superseded_validations(steps: List[int], epochs: List[float], val_steps: List[int], val_after: List[int]):
    """``dropped[v]``: a training record logged after validation v has a step <= its step
    (same epoch rule as :func:`superseded_records`, with the epoch of the record before v)."""
    dropped = [False] * len(val_steps)
    order = sorted(range(len(val_steps)), key=lambda v: -val_after[v])
    later_min: Dict[Optional[float], int] = {}
    position = len(steps)
    for v in order:
        while position > val_after[v]:
            position -= 1
            epoch = _epoch(epochs, position)
            later_min[epoch] = min(later_min.get(epoch, steps[position]), steps[position])
        epoch = _epoch(epochs, val_after[v] - 1) if val_after[v] > 0 else None
        dropped[v] = any(
            step <= val_steps[v] for key, step in later_min.items() if key is None or epoch is None or key <= epoch
        )
    return dropped


def _epoch(epochs: List[float], index: int) -> Optional[float]:
    value = epochs[index] if index < len(epochs) else NAN
    return None if value is None or not math.isfinite(value) else float(value)


def drop_superseded(metrics: "TrainingMetrics") -> int:
    """Remove superseded training and validation records; returns how many were removed."""
    (steps, train), (val_steps, val) = _groups(metrics)
    metrics.val_after.extend([len(steps)] * (len(val_steps) - len(metrics.val_after)))
    gone = superseded_records(steps, metrics.epochs)
    gone_val = superseded_validations(steps, metrics.epochs, val_steps, metrics.val_after)
    if not any(gone) and not any(gone_val):
        return 0
    kept_before = [0]
    for flag in gone:
        kept_before.append(kept_before[-1] + (not flag))
    metrics.val_after[:] = [kept_before[after] for after in metrics.val_after]
    for values, flags in [(steps, gone), *[(s, gone) for s in train.values()], (val_steps, gone_val)]:
        values[:] = [x for x, flag in zip(values, flags) if not flag]
    for values in [*val.values(), metrics.val_after]:
        values[:] = [x for x, flag in zip(values, gone_val) if not flag]
    return sum(gone) + sum(gone_val)
