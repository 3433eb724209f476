"""Parse training logs into ``TrainingMetrics``.

Text logs use the line formats below (fields in any order, ``|``-separated after the header;
the training line is one line, wrapped here)::

    [Epoch 1/3] Step 100 | Tokens: 1.6M | LM Loss: 10.4500 | Polar: 2.7497 | PPL: 34546.05 \
        | LR: 8.19e-08 | GradNorm: 5.96 | Gate std: 0.0838 | Tok/s: 20555
    [Validation] Loss: 3.3593, PPL: 28.77, Train/Val Gap: 0.83x

    Config: dim=512, layers=6, heads=8
    Mode: MEMORY+ATTENTION

``Config:`` ``key=value`` pairs and the ``Mode:`` text go to ``metrics.config``. Other formats are
recognised by content: a JSON document with ``log_history`` (Hugging Face ``trainer_state.json``),
one JSON object per line, or CSV with a step column. Custom text formats: subclass ``LogParser``
and override ``_parse_line`` (call ``super()._parse_line(line)`` for lines you do not handle), then
``parse_training_log(path, parser_cls=MyLogParser)``; whatever a line appends stays tied to its
step (:mod:`analog.runs.alignment`).

Parsing is linear in the input: no pattern here can backtrack over a run of spaces more than once.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Type, Union

from analog.runs.alignment import mark, settle
from analog.runs.structured import (
    add_record,
    canonical,
    looks_like_csv,
    parse_csv,
    parse_json_lines,
    parse_trainer_state,
    record_from_line,
)
from analog.runs.training_metrics import TrainingMetrics

PathLike = Union[str, os.PathLike]
_SUFFIXES = {"": 1, "K": 10**3, "k": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_NUMBER = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)([KkMBGT]?)[x%]?$")


#: what to do with TensorBoard event files, which need a TensorBoard reader analog does not depend on
TENSORBOARD_HINT = (
    "event files are not read; export the scalars as CSV (TensorBoard's data download links) or JSON Lines, "
    "or read trainer_state.json where a Hugging Face Trainer wrote one"
)


class LogParseError(ValueError):
    """A log that cannot be read at all (empty, binary, or without a single metrics line)."""


def parse_number(text: str) -> float:
    """``"1.6M"`` -> 1600000.0, ``"0.83x"`` -> 0.83, ``"8.19e-08"``, ``"nan"``/``"inf"``.

    Suffixes K/k, M, B/G, T multiply by 10^3, 10^6, 10^9, 10^12 (exactly, via ``Decimal``).
    Raises ``ValueError`` for anything else.
    """
    text = text.strip()
    if text.lower() in ("nan", "inf", "+inf", "-inf"):
        return float(text)
    match = _NUMBER.match(text)
    if not match:
        raise ValueError(f"not a number: {text!r}")
    try:
        return float(Decimal(match.group(1)) * _SUFFIXES[match.group(2)])
    except InvalidOperation as error:
        raise ValueError(f"not a number: {text!r}") from error


class LogParser:
    """Line-by-line parser of text training logs; fills ``self.metrics``.

    A line whose header matches ``TRAIN_PATTERN`` or ``VALIDATION_PATTERN`` but whose fields cannot
    be read is counted in ``metrics.malformed_lines`` (with an example); other lines are ignored.
    """

    TRAIN_PATTERN = re.compile(r"(?:\[Epoch\s+(\d+)\s*/\s*(\d+)\]\s*)?\bStep\s+(\d+)\s*(\|.*)?$")
    VALIDATION_PATTERN = re.compile(r"\[Validation\]\s*(.*)$")
    #: a field's key (matched whole, after splitting at the first ``:`` or ``=``; linear)
    KEY_PATTERN = re.compile(r"[A-Za-z][\w /.\-]*")
    #: ``Config: k=v, k=v`` and ``Mode: TEXT`` headers (found with ``str.find``, never a regex)
    CONFIG_HEADER = "Config:"
    MODE_HEADER = "Mode:"
    #: field name (lower case) -> series of a training line
    TRAIN_FIELDS: Dict[str, str] = {
        "lm loss": "loss",
        "loss": "loss",
        "train loss": "loss",
        "ppl": "ppl",
        "lr": "lr",
        "gradnorm": "grad_norm",
        "grad norm": "grad_norm",
        "tok/s": "tok_per_sec",
        "tokens/s": "tok_per_sec",
        "tokens": "tokens",
    }
    #: field name (lower case) -> series of a validation line
    VALIDATION_FIELDS: Dict[str, str] = {
        "loss": "val_loss",
        "ppl": "val_ppl",
        "train/val gap": "val_gap",
        "tokens": "val_tokens",
    }

    #: ``iter 10: loss 3.2257, time 120.32ms, mfu 3.10%`` and ``step 20: train loss 2.63, val loss 2.65``
    #: (nanoGPT and scripts like it): a step word, the step, a colon, then comma-separated fields
    COLON_STEP_PATTERN = re.compile(r"^\s*(?:iter|iteration|step)\s+(\d+)\s*:(.*)$", re.IGNORECASE)
    #: a field's number followed by a unit (``120.32ms``): the unit joins the name (``time_ms``)
    UNIT_PATTERN = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)([A-Za-z]{1,3})$")

    def __init__(self, source: str = ""):
        self.metrics = TrainingMetrics(source=source, format="text")
        self.line_number = 0
        self._pending_eval: Optional[Tuple[int, Dict[str, float], str, int]] = None

    def parse_file(self, path: PathLike) -> TrainingMetrics:
        with open(path, encoding="utf-8") as handle:
            return self.parse_lines(handle)

    def parse_lines(self, lines: Iterable[str]) -> TrainingMetrics:
        """Parse every line; values appended while reading a line are tied to that line's step."""
        for self.line_number, line in enumerate(lines, start=1):
            self.metrics.lines_read = self.line_number
            before = mark(self.metrics)
            self._parse_line(line.rstrip("\r\n"))
            settle(self.metrics, before, self.line_number)
        if self._pending_eval is not None:
            before = mark(self.metrics)
            self._flush_eval()
            settle(self.metrics, before, self.line_number)
        return self.metrics.finish()

    def _parse_line(self, line: str) -> None:
        """Read one line: a validation line, a training line, a ``{...}`` record, a ``step=N key=value``
        line, or something to ignore."""
        record = record_from_line(line)
        if record is not None:
            self._read_record(line, record)
            return
        match = self.VALIDATION_PATTERN.search(line)
        if match:
            self._read_fields(line, match.group(1), ",", self.VALIDATION_FIELDS, validation=True)
            return
        match = self.TRAIN_PATTERN.search(line)
        if match:
            epoch, total, step, rest = match.groups()
            if epoch is None and rest is None:
                return
            if total is not None:
                self.metrics.total_epochs = int(total)
            values = {"epochs": float(epoch)} if epoch is not None else {}
            self._read_fields(line, rest or "", "|", self.TRAIN_FIELDS, step=int(step), values=values)
            return
        match = self.COLON_STEP_PATTERN.match(line)
        if match:
            self._read_colon_step_line(line, int(match.group(1)), match.group(2))
            return
        if not self._read_key_values(line):
            self._read_header(line)

    def _read_colon_step_line(self, line: str, step: int, text: str) -> None:
        """``iter N: loss 3.22, time 120.32ms, mfu 3.10%``: fields ``name value`` (or ``name=value``,
        ``name: value``) separated by commas, names mapped as in structured logs with spaces read as
        ``_`` (``val loss`` -> ``val_loss``); a unit after a number joins the name (``time_ms``).

        A line with a validation value (nanoGPT's ``step N: train loss X, val loss Y``, printed before
        the ``iter N`` line of the same step) is held until the training record of step N arrives,
        so that it is not taken for the record of an earlier attempt (see resumed runs); its ``train
        loss``, an estimate over evaluation batches, becomes the extra ``estimated_train_loss`` of
        that training record."""
        record: Dict[str, float] = {"step": step}
        for field in filter(str.strip, text.split(",")):
            field = field.strip()
            cut = min((i for i in (field.find(":"), field.find("=")) if i >= 0), default=-1)
            key, _, raw = (field[:cut], "", field[cut + 1 :]) if cut >= 0 else field.rpartition(" ")
            key, raw = "_".join(key.split()).lower(), raw.strip()
            if not key or not raw or not self.KEY_PATTERN.fullmatch(key):
                self.metrics.add_malformed(self.line_number, line, f"cannot read field {field[:80]!r}")
                return
            try:
                record[key] = parse_number(raw)
            except ValueError:
                unit = self.UNIT_PATTERN.match(raw)
                if unit is None or canonical(key) is not None:
                    self.metrics.add_malformed(self.line_number, line, f"{key}: {raw!r} is not a number")
                    return
                record[f"{key}_{unit.group(2).lower()}"] = float(unit.group(1))
        validation = {k: v for k, v in record.items() if canonical(k) in ("val_loss", "val_ppl")}
        if validation:
            if self._pending_eval is not None:
                self._flush_eval()
            train = [record[k] for k in record if canonical(k) == "loss"]
            extras = {"estimated_train_loss": train[-1]} if train else {}
            self._pending_eval = (step, {**validation, **extras}, line, self.line_number)
            return
        if len(record) == 1:
            self.metrics.add_malformed(self.line_number, line, "no metric fields")
            return
        if self._pending_eval is not None and self._pending_eval[0] < step:
            self._flush_eval()
        if self._pending_eval is not None and self._pending_eval[0] == step:
            record.update(self._pending_eval[1])
            self._pending_eval = None
        self._read_record(line, record)

    def _flush_eval(self) -> None:
        """Add the held validation line as a record of its own (no training record of its step came)."""
        step, values, line, _ = self._pending_eval
        self._pending_eval = None
        self._read_record(line, {"step": step, **{k: v for k, v in values.items() if canonical(k)}})

    def _read_record(self, line: str, record: Dict) -> None:
        """A JSON or Python-dict line, read as a structured record (``analog.runs.structured``). One
        without a step (a printed config dict, a Trainer console line) is not malformed in a text log;
        it is counted in ``metrics.unstepped_records``."""
        reason = add_record(self.metrics, record)
        if reason and reason != "no step":
            self.metrics.add_malformed(self.line_number, line, reason)

    def _read_key_values(self, line: str) -> bool:
        """``step=10 loss=2.31 lr=1e-3`` (pairs separated by spaces, ``,``, ``;`` or ``|``): a record when
        one key is a step column (``step``, ``global_step``, ``iter``, ...); keys are mapped as in
        structured logs (``val_loss``/``eval_loss`` make it a validation point). False when it is not
        such a line. A known key with an unreadable value makes the line malformed."""
        if "=" not in line:
            return False
        pairs = {}
        for token in line.replace(",", " ").replace(";", " ").replace("|", " ").split():
            key, sep, value = token.partition("=")
            if sep and key and value:
                pairs[key] = value
        if not any(canonical(key) == "step" for key in pairs):
            return False
        record = {}
        for key, raw in pairs.items():
            try:
                record[key] = parse_number(raw)
            except ValueError:
                if canonical(key) is not None:
                    self.metrics.add_malformed(self.line_number, line, f"{key}: {raw!r} is not a number")
                    return True
        self._read_record(line, record)
        return True

    def _read_header(self, line: str) -> None:
        """``Config: dim=512, layers=6`` -> ``config["dim"] = 512, ...``; ``Mode: X`` -> ``config["mode"]``."""
        for header in (self.CONFIG_HEADER, self.MODE_HEADER):
            index = line.find(header)
            if index < 0 or (index > 0 and line[index - 1].isalnum()):
                continue
            text = line[index + len(header) :].strip()
            if header == self.MODE_HEADER:
                self.metrics.config["mode"] = text
                return
            pairs = [part.partition("=") for part in text.split(",")]
            if text and all(sep and key.strip() for key, sep, _ in pairs):
                self.metrics.config.update({key.strip(): _config_value(value) for key, _, value in pairs})
            else:
                self.metrics.config["config"] = text
            return

    def _read_fields(self, line, text, sep, known, step=None, values=None, validation=False) -> None:
        """Parse ``Key: value`` fields; a known key with an unreadable value makes the line malformed.
        Unknown keys with numeric values go to ``extras`` (``Gate std`` -> ``gate_std``)."""
        values = dict(values or {})
        found = 0
        for field in filter(str.strip, text.split(sep)):
            split = self._split_field(field)
            if split is None:
                self.metrics.add_malformed(self.line_number, line, f"cannot read field {field.strip()[:80]!r}")
                return
            label, raw = split
            key = label.lower()
            name = known.get(key)
            try:
                value = parse_number(raw)
            except ValueError:
                if name is None:
                    continue
                self.metrics.add_malformed(self.line_number, line, f"{label}: {raw!r} is not a number")
                return
            found += 1
            if name is not None:
                values[name] = value
            elif not validation:
                values[re.sub(r"\W+", "_", key).strip("_")] = value
        if not found:
            self.metrics.add_malformed(self.line_number, line, "no metric fields")
        elif validation:
            self.metrics.add_validation(**values)
        else:
            self.metrics.add_step(step, **values)

    def _split_field(self, field: str) -> Optional[Tuple[str, str]]:
        """``" LM Loss: 10.45 "`` -> ``("LM Loss", "10.45")``: split at the first ``:`` or ``=``; the
        key must match ``KEY_PATTERN`` and the value be one token. None when it is not a field."""
        cut = min((i for i in (field.find(":"), field.find("=")) if i >= 0), default=-1)
        if cut < 0:
            return None
        key, value = field[:cut].strip(), field[cut + 1 :].split()
        if len(value) != 1 or not self.KEY_PATTERN.fullmatch(key):
            return None
        return key, value[0]


def _config_value(text: str) -> Union[int, float, str]:
    """``"512"`` -> 512, ``"1e-3"`` -> 0.001, anything else stays text."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return parse_number(text)
    except ValueError:
        return text


def _read_text(path: Path) -> str:
    """The file's text; ``LogParseError`` naming the file when it is empty or binary."""
    data = path.read_bytes()
    if not data.strip():
        raise LogParseError(f"training log {path} is empty")
    if b"\x00" in data[:8192]:
        raise LogParseError(f"training log {path} is a binary file, not a text log")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LogParseError(f"training log {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


_TRAINER_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def detect_format(text: str) -> str:
    """``trainer_state``, ``jsonl``, ``csv`` or ``text``, from the content alone."""
    stripped = text.lstrip()
    first_line = stripped.splitlines()[0] if stripped else ""
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError:
            return "jsonl"
        return "trainer_state" if isinstance(document, dict) and "log_history" in document else "jsonl"
    if looks_like_csv(first_line):
        return "csv"
    return "text"


def latest_trainer_checkpoint(folder: Path) -> Optional[Path]:
    """The ``checkpoint-N`` sub-folder of a Trainer output directory with the largest N that holds a
    ``trainer_state.json`` (its ``log_history`` is the whole run up to step N), or ``None``.

    The Trainer writes ``trainer_state.json`` into each checkpoint folder and into the output
    directory itself only when ``save_state()`` is called."""
    found = []
    for child in folder.iterdir():
        match = _TRAINER_CHECKPOINT.fullmatch(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def parse_training_log(path: PathLike, parser_cls: Optional[Type[LogParser]] = None) -> TrainingMetrics:
    """Parse the training log at ``path``: a file, a directory holding ``trainer_state.json``, or a
    Trainer output directory whose ``checkpoint-N/`` folders hold one (the largest N is read).

    The format is detected from the content (see ``detect_format``); ``parser_cls`` replaces
    ``LogParser`` for text logs. Raises ``FileNotFoundError`` for a missing path and
    ``LogParseError`` for an empty or binary file or one without a single metrics record.
    """
    path = Path(path)
    if path.is_dir() and not (path / "trainer_state.json").is_file():
        path = latest_trainer_checkpoint(path) or path
    if path.is_dir():
        if not (path / "trainer_state.json").is_file():
            events = sorted(path.rglob("events.out.tfevents.*"))[:1]
            hint = f" (it holds TensorBoard event files such as {events[0]}: {TENSORBOARD_HINT})" if events else ""
            raise FileNotFoundError(f"{path} is a directory without trainer_state.json{hint}")
        path = path / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    if "tfevents" in path.name:
        raise LogParseError(f"{path} is a TensorBoard event file: {TENSORBOARD_HINT}")
    text = _read_text(path)
    kind = "text" if parser_cls is not None else detect_format(text)
    metrics = TrainingMetrics(source=str(path), format=kind)
    try:
        if kind == "trainer_state":
            parse_trainer_state(text, metrics)
        elif kind == "jsonl":
            parse_json_lines(text.splitlines(), metrics)
        elif kind == "csv":
            parse_csv(text, metrics)
        else:
            metrics = (parser_cls or LogParser)(source=str(path)).parse_lines(text.splitlines())
    except ValueError as error:
        raise LogParseError(f"cannot parse {path} as {kind}: {error}") from error
    metrics.finish()
    if metrics.num_records == 0:
        hint = ""
        if metrics.unstepped_records:
            hint = (
                f"; {metrics.unstepped_records} records have metrics but no step (Hugging Face Trainer console "
                "lines carry only 'epoch'): read trainer_state.json from the output directory or a checkpoint-N "
                "folder instead"
            )
        raise LogParseError(
            f"no training metrics found in {path} (read as {kind}: {metrics.lines_read} lines, "
            f"{metrics.malformed_lines} malformed){hint}"
        )
    return metrics
