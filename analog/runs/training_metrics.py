"""``TrainingMetrics``: the series parsed from one training log."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from analog.runs.alignment import drop_superseded

NAN = float("nan")

#: per-step series, aligned with ``steps`` (NaN where a line did not report the value)
STEP_SERIES = ("epochs", "tokens", "loss", "ppl", "lr", "grad_norm", "tok_per_sec")
#: validation series, aligned with ``val_steps``
VAL_SERIES = ("val_tokens", "val_loss", "val_ppl", "val_gap")


def finite(values: List[float]) -> List[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


@dataclass
class TrainingMetrics:
    """Series of one run. Per-step lists are aligned with ``steps``; validation lists with
    ``val_steps`` (the last training step seen before the validation line). ``extras`` holds
    per-step metrics the parser has no field for (``polar``, ``gate_std``, ...), also aligned.
    ``config`` holds what ``Config:`` and ``Mode:`` lines said (``{"dim": 512, "mode": "MEMORY"}``).
    ``val_after[v]``: how many training records were logged before validation record v.
    ``resumed_records``: records dropped because a resumed run logged their steps again
    (see :mod:`analog.runs.alignment`).
    """

    source: str = ""
    format: str = "text"
    steps: List[int] = field(default_factory=list)
    epochs: List[float] = field(default_factory=list)
    tokens: List[float] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    ppl: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    grad_norm: List[float] = field(default_factory=list)
    tok_per_sec: List[float] = field(default_factory=list)
    extras: Dict[str, List[float]] = field(default_factory=dict)
    val_steps: List[int] = field(default_factory=list)
    val_tokens: List[float] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    val_ppl: List[float] = field(default_factory=list)
    val_gap: List[float] = field(default_factory=list)
    total_epochs: Optional[int] = None
    config: Dict[str, Any] = field(default_factory=dict)
    val_after: List[int] = field(default_factory=list, repr=False)
    resumed_records: int = 0
    #: records with metrics but no step (Hugging Face Trainer console lines carry only ``epoch``)
    unstepped_records: int = 0
    lines_read: int = 0
    malformed_lines: int = 0
    malformed_examples: List[str] = field(default_factory=list)

    def add_step(self, step: int, **values: float) -> None:
        """Append one training record; series not given get NaN, unknown names go to ``extras``."""
        self.steps.append(int(step))
        for name in STEP_SERIES:
            getattr(self, name).append(float(values.pop(name, NAN)))
        for name in list(self.extras) + [key for key in values if key not in self.extras]:
            series = self.extras.setdefault(name, [NAN] * (len(self.steps) - 1))
            series.append(float(values.get(name, NAN)))

    def add_validation(self, step: Optional[int] = None, **values: float) -> None:
        """Append one validation record at ``step`` (default: the last training step, or 0)."""
        if step is None:
            step = self.steps[-1] if self.steps else 0
        self.val_steps.append(int(step))
        self.val_after.append(len(self.steps))
        if "val_tokens" not in values and self.tokens and self.steps and step == self.steps[-1]:
            values["val_tokens"] = self.tokens[-1]
        for name in VAL_SERIES:
            getattr(self, name).append(float(values.get(name, NAN)))

    def add_malformed(self, line_number: int, line: str, reason: str = "", keep: int = 5) -> None:
        """Count a line that looked like a metrics line but could not be read."""
        self.malformed_lines += 1
        if len(self.malformed_examples) < keep:
            text = line.strip()[:200]
            self.malformed_examples.append(f"line {line_number}: {text}" + (f" ({reason})" if reason else ""))

    def pad(self) -> None:
        """Pad per-step and validation series to the length of their step lists with NaN
        (for parsers that append to only some series); longer series are an error."""
        for names, steps in ((STEP_SERIES, self.steps), (VAL_SERIES, self.val_steps)):
            for name in names:
                self._pad_list(name, getattr(self, name), len(steps))
        for name, series in self.extras.items():
            self._pad_list(f"extras[{name}]", series, len(self.steps))

    def finish(self) -> "TrainingMetrics":
        """Pad the series, then drop records a resumed run logged again (the last one of a step is
        kept); ``resumed_records`` counts the dropped ones."""
        self.pad()
        self.resumed_records += drop_superseded(self)
        return self

    @property
    def tokens_per_sec(self) -> List[float]:
        """The seed's name of ``tok_per_sec``."""
        return self.tok_per_sec

    @staticmethod
    def _pad_list(name: str, series: List[float], length: int) -> None:
        if len(series) > length:
            raise ValueError(f"series {name} has {len(series)} values for {length} steps")
        series.extend([NAN] * (length - len(series)))

    @property
    def num_records(self) -> int:
        return len(self.steps) + len(self.val_steps)

    def has(self, name: str) -> bool:
        """True when the per-step series ``name`` holds at least one finite value."""
        values = self.extras.get(name) if name in self.extras else getattr(self, name, [])
        return bool(finite(values))

    def summary(self) -> Dict[str, Optional[float]]:
        """Headline numbers: last/min training loss and ppl, best validation, mean throughput and
        gradient norm (over the finite values), records dropped by resumes."""

        def last(values):
            vals = finite(values)
            return vals[-1] if vals else None

        def best(values):
            vals = finite(values)
            return min(vals) if vals else None

        tok_s = finite(self.tok_per_sec)
        grad = finite(self.grad_norm)
        return {
            "num_steps": len(self.steps),
            "last_step": self.steps[-1] if self.steps else None,
            "total_tokens": last(self.tokens),
            "final_loss": last(self.loss),
            "min_loss": best(self.loss),
            "final_ppl": last(self.ppl),
            "min_ppl": best(self.ppl),
            "final_lr": last(self.lr),
            "num_validations": len(self.val_steps),
            "final_val_loss": last(self.val_loss),
            "best_val_loss": best(self.val_loss),
            "final_val_ppl": last(self.val_ppl),
            "best_val_ppl": best(self.val_ppl),
            "mean_tok_per_sec": sum(tok_s) / len(tok_s) if tok_s else None,
            "mean_grad_norm": sum(grad) / len(grad) if grad else None,
            "resumed_records": self.resumed_records,
            "malformed_lines": self.malformed_lines,
        }
