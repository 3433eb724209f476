"""Structured training logs: Hugging Face ``trainer_state.json``, JSON Lines and CSV.

Column/key names are matched case-insensitively through ``COLUMN_ALIASES`` (``learning_rate`` -> ``lr``,
``eval_loss`` -> ``val_loss``, ...). A record with a validation key is a validation point (its
``eval_*`` keys such as ``eval_runtime`` are dropped; a training loss, lr, ... in the same record
also makes a training point). Any other record with a step is a training point, its unknown
numeric keys going to ``extras``. A record that only adds keys to the previous training step
(same step, no conflicting value: Lightning's epoch-end row repeats the epoch) is merged into it.
Empty cells are absent values, not NaN: a CSV row of validation columns only is a validation point,
not also an empty training point (Lightning's ``CSVLogger`` writes its training and validation rows
apart, each with the other's cells empty).
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from analog.runs.training_metrics import NAN, STEP_SERIES, VAL_SERIES, TrainingMetrics

COLUMN_ALIASES = {
    "step": ("step", "global_step", "iteration", "iter", "train/global_step"),
    "epochs": ("epoch", "train/epoch"),
    "loss": ("loss", "lm_loss", "train/loss", "train_loss", "train_loss_step"),
    "ppl": ("ppl", "perplexity", "train_ppl", "train/ppl"),
    "lr": ("lr", "learning_rate", "train/learning_rate"),
    "grad_norm": ("grad_norm", "gradnorm", "train/grad_norm"),
    "tokens": ("tokens", "tokens_seen", "num_input_tokens_seen", "train/num_input_tokens_seen"),
    "tok_per_sec": ("tok_per_sec", "tok/s", "tokens_per_sec", "tokens_per_second", "throughput"),
    "val_loss": ("val_loss", "eval_loss", "validation_loss", "eval/loss", "val/loss"),
    "val_ppl": ("val_ppl", "eval_ppl", "eval_perplexity", "validation_ppl", "eval/ppl", "val/ppl"),
    "val_gap": ("val_gap", "train_val_gap"),
}
_CANONICAL = {alias: name for name, aliases in COLUMN_ALIASES.items() for alias in aliases}
#: keys of end-of-training summaries, not of a step (Hugging Face ``train_runtime`` record)
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "total_flos")


#: Lightning's ``LearningRateMonitor`` columns: ``lr-Adam``, ``lr-AdamW`` (one param group; ``lr-Adam/pg2`` is an extra)
_LR_MONITOR = re.compile(r"lr-[A-Za-z0-9_]+")
#: the longest line read as a Python dict literal (a console line of a trainer, not a data dump)
MAX_LITERAL_LINE = 100_000


def canonical(key: str) -> Optional[str]:
    """Canonical series name of a column/key, or None when it is not one we know."""
    key = key.strip()
    if _LR_MONITOR.fullmatch(key):
        return "lr"
    return _CANONICAL.get(key.lower())


def record_from_line(line: str) -> Optional[Dict[str, Any]]:
    """A ``{...}`` line as a dict: JSON, or a Python dict literal such as the Hugging Face Trainer prints
    (``{'loss': '4.047', 'epoch': '0.25'}``, read with ``ast.literal_eval``: literals only, no code);
    None when the line is neither."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        if len(text) > MAX_LITERAL_LINE:
            return None
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return record if isinstance(record, dict) else None


def to_float(value: Any) -> float:
    """A JSON/CSV cell as float: numbers as they are, '' or None as NaN; raises ValueError else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return NAN
    if isinstance(value, bool):
        raise ValueError(f"boolean {value!r} is not a metric value")
    if isinstance(value, (int, float)):
        return float(value)
    return float(str(value).strip())


def add_record(metrics: TrainingMetrics, record: Mapping[str, Any]) -> Optional[str]:
    """Add one key/value record; returns a reason string when it is malformed, None otherwise."""
    if any(key in record for key in SUMMARY_KEYS):
        return None
    values: Dict[str, float] = {}
    extras: Dict[str, float] = {}
    for key, raw in record.items():
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue  # an empty cell (CSV rows of a logger that writes train and validation rows apart)
        name = canonical(str(key))
        try:
            value = to_float(raw)
        except (TypeError, ValueError):
            if name is not None:
                return f"{key}={raw!r} is not a number"
            continue
        if name is not None:
            values[name] = value
        else:
            extras[str(key)] = value
    if "step" not in values or math.isnan(values["step"]):
        if values or extras:
            metrics.unstepped_records += 1
            return "no step"
        return None
    step = int(values.pop("step"))
    val_values = {k: values.pop(k) for k in VAL_SERIES if k in values}
    if val_values:
        if set(values) - {"epochs"}:  # a training point in the same record comes first
            extras = {k: v for k, v in extras.items() if not k.lower().startswith(("eval", "val"))}
            _add_or_merge(metrics, step, {**values, **extras})
        metrics.add_validation(step, **val_values)
        return None
    if values or extras:
        _add_or_merge(metrics, step, {**values, **extras})
    return None


def _add_or_merge(metrics: TrainingMetrics, step: int, values: Dict[str, float]) -> None:
    if metrics.steps and metrics.steps[-1] == step:

        def current(name):
            series = getattr(metrics, name) if name in STEP_SERIES else metrics.extras.get(name)
            return series[-1] if series else NAN

        if all(math.isnan(current(name)) or current(name) == value for name, value in values.items()):
            for name, value in values.items():
                if name in STEP_SERIES:
                    getattr(metrics, name)[-1] = value
                else:
                    series = metrics.extras.setdefault(name, [NAN] * len(metrics.steps))
                    series[-1] = value
            return
    metrics.add_step(step, **values)


def parse_trainer_state(text: str, metrics: TrainingMetrics) -> TrainingMetrics:
    """Hugging Face ``trainer_state.json``: the records of its ``log_history`` list."""
    state = json.loads(text)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError("JSON document has no 'log_history' list")
    metrics.lines_read = len(history)
    for index, record in enumerate(history, start=1):
        reason = add_record(metrics, record) if isinstance(record, dict) else "not an object"
        if reason:
            metrics.add_malformed(index, json.dumps(record)[:200], f"log_history[{index - 1}]: {reason}")
    return metrics


def parse_json_lines(lines: Iterable[str], metrics: TrainingMetrics) -> TrainingMetrics:
    """One JSON object per line; blank lines are skipped, anything else is malformed."""
    for number, line in enumerate(lines, start=1):
        metrics.lines_read = number
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            record = record_from_line(line)
            if record is None:
                metrics.add_malformed(number, line, f"invalid JSON: {error.msg}")
                continue
        reason = add_record(metrics, record) if isinstance(record, dict) else "not a JSON object"
        if reason:
            metrics.add_malformed(number, line, reason)
    return metrics


def _export_header(header: List[str], source: str) -> List[str]:
    """Column names of the CSV exports of two dashboards, made readable by ``add_record``.

    * TensorBoard's scalar download ``Wall time,Step,Value`` holds one tag, named only in the file
      name (``run-NAME-tag-train_loss.csv``, ``/`` in the tag written as ``_``): ``Value`` takes the
      tag (else the file stem) and ``Wall time`` is dropped (renamed so it matches no series).
    * A Weights & Biases panel export ``"Step","RUN - train/loss","RUN - train/loss__MIN",...``:
      the ``RUN - `` prefix is removed and the ``__MIN``/``__MAX`` columns dropped; an export of
      several runs is an error (``ValueError``) naming them."""
    if [cell.lower() for cell in header] == ["wall time", "step", "value"]:
        stem = Path(source).stem if source else "value"
        tag = stem.split("-tag-", 1)[1] if "-tag-" in stem else stem
        return ["", header[1], tag]
    others = [cell for cell in header if canonical(cell) != "step"]
    prefixes = {cell.split(" - ", 1)[0] for cell in others if " - " in cell}
    if others and len(prefixes) > 1 and all(" - " in cell for cell in others):
        names = ", ".join(sorted(prefixes)[:5])
        raise ValueError(f"a Weights & Biases export of {len(prefixes)} runs ({names}): export one run per file")
    if others and len(prefixes) == 1 and all(" - " in cell for cell in others):
        return [
            "" if cell.endswith(("__MIN", "__MAX")) else cell.split(" - ", 1)[1] if " - " in cell else cell
            for cell in header
        ]
    return header


def parse_csv(text: str, metrics: TrainingMetrics) -> TrainingMetrics:
    """A header row, then one row per record; rows with the wrong number of cells are malformed.
    Empty column names (dropped export columns, see ``_export_header``) are not read."""
    rows = csv.reader(io.StringIO(text))
    header = _export_header([cell.strip() for cell in next(rows)], metrics.source)
    for number, row in enumerate(rows, start=2):
        metrics.lines_read = number
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            metrics.add_malformed(number, ",".join(row), f"{len(row)} cells for {len(header)} columns")
            continue
        reason = add_record(metrics, {k: v for k, v in zip(header, row) if k})
        if reason:
            metrics.add_malformed(number, ",".join(row), reason)
    return metrics


def looks_like_csv(first_line: str) -> bool:
    """A header row: comma-separated names, one of which is a step column."""
    cells = [cell.strip() for cell in next(csv.reader([first_line]), [])]  # quoted cells too (W&B)
    return len(cells) >= 2 and any(canonical(cell) == "step" for cell in cells)
