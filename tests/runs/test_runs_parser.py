"""parse_training_log: the seed's line formats, custom formats, structured logs and bad input."""

import json
import math
import re

import pytest

from analog.runs import LogParseError, LogParser, detect_format, parse_number, parse_training_log

SEED_TRAIN = (
    "[Epoch 1/3] Step 100 | Tokens: 1.6M | LM Loss: 10.4500 | Polar: 2.7497 | PPL: 34546.05 | "
    "LR: 8.19e-08 | GradNorm: 5.96 | Gate std: 0.0838 | Tok/s: 20555"
)
SEED_VAL = "[Validation] Loss: 3.3593, PPL: 28.77, Train/Val Gap: 0.83x"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_seed_lines_parse_to_exact_values(tmp_path):
    text = "\n".join(["Loading model ...", SEED_TRAIN, SEED_VAL, "Saving checkpoint at Step 100"]) + "\n"
    metrics = parse_training_log(_write(tmp_path, "train.log", text))
    assert metrics.format == "text" and metrics.total_epochs == 3
    assert metrics.steps == [100]
    assert metrics.epochs == [1.0]
    assert metrics.tokens == [1_600_000.0]
    assert metrics.loss == [10.45]
    assert metrics.ppl == [34546.05]
    assert metrics.lr == [8.19e-08]
    assert metrics.grad_norm == [5.96]
    assert metrics.tok_per_sec == [20555.0]
    assert metrics.extras == {"polar": [2.7497], "gate_std": [0.0838]}
    assert metrics.val_steps == [100]
    assert metrics.val_loss == [3.3593]
    assert metrics.val_ppl == [28.77]
    assert metrics.val_gap == [0.83]
    assert metrics.val_tokens == [1_600_000.0]
    assert metrics.malformed_lines == 0 and metrics.lines_read == 4


def test_numbers():
    assert parse_number("1.6M") == 1_600_000.0
    assert parse_number("2.5K") == 2500.0 and parse_number("1B") == 1e9
    assert parse_number("0.83x") == 0.83 and parse_number("-3e-2") == -0.03
    assert math.isnan(parse_number("nan"))
    with pytest.raises(ValueError):
        parse_number("12abc")


def test_malformed_lines_are_counted_not_fatal(tmp_path):
    lines = [
        SEED_TRAIN,
        "[Epoch 1/3] Step 200 | Tokens: 3.2M | LM Loss: oops | PPL: 3.0",
        "[Epoch 1/3] Step 300 | Tokens: 4.8M | LM Lo",
        "[Validation] Loss: , PPL: 28.77",
        SEED_TRAIN.replace("Step 100", "Step 400").replace("10.4500", "nan"),
    ]
    metrics = parse_training_log(_write(tmp_path, "run.log", "\n".join(lines)))
    assert metrics.steps == [100, 400]
    assert metrics.loss[0] == 10.45 and math.isnan(metrics.loss[1])
    assert metrics.malformed_lines == 3
    assert [e.split(":")[0] for e in metrics.malformed_examples] == ["line 2", "line 3", "line 4"]
    assert "LM Loss: 'oops' is not a number" in metrics.malformed_examples[0]


def test_custom_format_by_subclassing(tmp_path):
    class MyLogParser(LogParser):
        MY_PATTERN = re.compile(r"step=(\d+) loss=([\d.]+)")

        def _parse_line(self, line):
            match = self.MY_PATTERN.search(line)
            if match:
                self.metrics.steps.append(int(match.group(1)))
                self.metrics.loss.append(float(match.group(2)))
                return
            super()._parse_line(line)

    text = "step=10 loss=2.5\nstep=20 loss=2.25\n" + SEED_VAL + "\n"
    metrics = parse_training_log(_write(tmp_path, "custom.log", text), parser_cls=MyLogParser)
    assert metrics.steps == [10, 20] and metrics.loss == [2.5, 2.25]
    assert len(metrics.ppl) == 2 and all(math.isnan(v) for v in metrics.ppl)
    assert metrics.val_steps == [20] and metrics.val_loss == [3.3593]


def test_trainer_state_json(tmp_path):
    state = {
        "global_step": 4,
        "log_history": [
            {"loss": 2.5, "grad_norm": 1.25, "learning_rate": 5e-05, "epoch": 0.5, "step": 2},
            {"eval_loss": 2.75, "eval_runtime": 0.1, "epoch": 0.5, "step": 2},
            {"loss": 2.0, "grad_norm": 1.0, "learning_rate": 2.5e-05, "epoch": 1.0, "step": 4},
            {"analysis/param_change/norm_l2": 0.5, "step": 4},
            {"train_runtime": 1.0, "train_loss": 2.25, "epoch": 1.0, "step": 4},
        ],
    }
    path = _write(tmp_path, "trainer_state.json", json.dumps(state, indent=2))
    metrics = parse_training_log(tmp_path)
    assert metrics.format == "trainer_state" and metrics.source == str(path)
    assert metrics.steps == [2, 4] and metrics.loss == [2.5, 2.0]
    assert metrics.lr == [5e-05, 2.5e-05] and metrics.grad_norm == [1.25, 1.0] and metrics.epochs == [0.5, 1.0]
    assert metrics.val_steps == [2] and metrics.val_loss == [2.75]
    assert math.isnan(metrics.extras["analysis/param_change/norm_l2"][0])
    assert metrics.extras["analysis/param_change/norm_l2"][1] == 0.5
    assert metrics.malformed_lines == 0


def test_json_lines_and_csv_detected_by_content(tmp_path):
    jsonl = '{"step": 1, "loss": 3.0, "lr": 0.1}\nnot json\n{"step": 2, "loss": 2.5, "val_loss": 2.75}\n'
    metrics = parse_training_log(_write(tmp_path, "metrics.txt", jsonl))
    assert metrics.format == "jsonl" and metrics.steps == [1, 2] and metrics.loss == [3.0, 2.5]
    assert metrics.val_steps == [2] and metrics.val_loss == [2.75] and metrics.malformed_lines == 1
    csv_text = "global_step,train/loss,learning_rate,custom\n1,3.0,0.1,7\n2,2.5,0.1\n3,2.25,,9\n"
    metrics = parse_training_log(_write(tmp_path, "log.data", csv_text))
    assert metrics.format == "csv" and metrics.steps == [1, 3] and metrics.loss == [3.0, 2.25]
    assert metrics.extras == {"custom": [7.0, 9.0]} and math.isnan(metrics.lr[1])
    assert metrics.malformed_lines == 1 and "3 cells for 4 columns" in metrics.malformed_examples[0]
    assert detect_format(SEED_TRAIN) == "text"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (b"\xff\xfe\xfa bad", "not UTF-8"),
        (b"hello\nworld\n", "no training metrics found"),
    ],
)
def test_unreadable_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.log"
    path.write_bytes(content)
    with pytest.raises(LogParseError, match=message) as info:
        parse_training_log(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.log"):
        parse_training_log(tmp_path / "nope.log")
