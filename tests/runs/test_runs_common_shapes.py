"""Logs in the shapes common tools write: plain ``step=N loss=x`` text, Lightning ``CSVLogger`` files
(training and validation rows apart), and the Hugging Face Trainer's console lines (Python dicts)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analog.cli import main
from analog.runs import LogParseError, parse_training_log


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_key_value_text(tmp_path):
    losses = [2.5 * 0.9**i for i in range(6)]
    lines = ["2026-01-01 12:00:00 INFO starting run name=demo"]
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        lines.append(f"step={step} loss={loss!r} lr=1e-3, grad_norm={1 + i / 10!r} mode=train")
        if step % 30 == 0:
            lines.append(f"step={step} val_loss={loss + 0.25!r}")
    lines.append("step=70 loss=oops")
    metrics = parse_training_log(_write(tmp_path, "train.log", "\n".join(lines) + "\n"))
    assert metrics.format == "text"
    assert metrics.steps == [10, 20, 30, 40, 50, 60]
    assert metrics.loss == losses and metrics.lr == [1e-3] * 6
    assert metrics.grad_norm == [1 + i / 10 for i in range(6)]
    assert metrics.val_steps == [30, 60] and metrics.val_loss == [losses[2] + 0.25, losses[5] + 0.25]
    assert metrics.malformed_lines == 1 and "loss: 'oops' is not a number" in metrics.malformed_examples[0]
    assert "mode" not in metrics.extras and "name" not in metrics.extras


LIGHTNING_CSV = """epoch,step,train_loss_step,lr-AdamW,val_loss,val_acc,train_loss_epoch
0,9,2.3,0.001,,,
0,19,2.0,0.001,,,
0,19,,,2.2,0.4,
0,19,,,,,2.15
1,29,1.8,0.0009,,,
1,39,1.7,0.0009,,,
1,39,,,1.9,0.5,
1,39,,,,,1.75
"""


def test_lightning_csv_logger(tmp_path):
    metrics = parse_training_log(_write(tmp_path, "metrics.csv", LIGHTNING_CSV))
    assert metrics.format == "csv"
    # the training rows, with the epoch-end row merged into its step: four steps, two validations
    assert metrics.steps == [9, 19, 29, 39] and metrics.loss == [2.3, 2.0, 1.8, 1.7]
    assert metrics.lr == [0.001, 0.001, 0.0009, 0.0009] and metrics.epochs == [0.0, 0.0, 1.0, 1.0]
    assert metrics.val_steps == [19, 39] and metrics.val_loss == [2.2, 1.9]
    assert metrics.summary()["num_validations"] == 2
    epoch_loss = metrics.extras["train_loss_epoch"]
    assert math.isnan(epoch_loss[0]) and epoch_loss[1] == 2.15 and epoch_loss[3] == 1.75
    assert metrics.malformed_lines == 0


def test_blank_cells_are_absent_but_a_logged_nan_stays(tmp_path):
    metrics = parse_training_log(_write(tmp_path, "m.csv", "step,loss,val_loss\n1,nan,\n2,1.5,\n2,,1.25\n"))
    assert metrics.steps == [1, 2] and math.isnan(metrics.loss[0]) and metrics.loss[1] == 1.5
    assert metrics.val_steps == [2] and metrics.val_loss == [1.25]


#: lines as transformers 5 prints them during Trainer.train() (values are strings; no step)
HF_CONSOLE = """{'loss': '4.169', 'grad_norm': '0.8295', 'learning_rate': '0.004833', 'epoch': '0.25'}
{'loss': '4.154', 'grad_norm': '0.7458', 'learning_rate': '0.0045', 'epoch': '0.5'}
{'eval_loss': '4.052', 'eval_runtime': '0.2898', 'eval_samples_per_second': '220.9', 'epoch': '1.25'}
Writing model shards: 100%|##########| 1/1 [00:00<00:00, 831.21it/s]
{'train_runtime': '12.78', 'train_samples_per_second': '18.79', 'train_loss': '4.013', 'epoch': '3.75'}
"""


@pytest.mark.parametrize("first", ["", "Some warning printed before training\n"], ids=["jsonl", "text"])
def test_hf_console_lines_say_where_the_steps_are(tmp_path, capsys, first):
    path = _write(tmp_path, "train.log", first + HF_CONSOLE)
    with pytest.raises(LogParseError, match="3 records have metrics but no step.*trainer_state.json"):
        parse_training_log(path)
    assert main(["runs", "summary", str(path)]) == 1
    assert "trainer_state.json" in capsys.readouterr().err


def test_python_dict_lines_with_a_step_are_read(tmp_path):
    text = ("config {'lr': 0.1}\n{'lr': 0.1, 'batch_size': 32}\n{'step': 5, 'loss': '2.0', 'learning_rate': 0.1}\n"
            "noise\n{'step': 10, 'loss': 1.5}\n{'step': 15, 'loss': 'diverged'}\n")
    metrics = parse_training_log(_write(tmp_path, "x.log", text))
    assert metrics.steps == [5, 10] and metrics.loss == [2.0, 1.5] and metrics.lr[0] == 0.1
    # a printed config dict has no step: not malformed in a text log; a non-number loss is
    assert metrics.unstepped_records == 1 and metrics.malformed_lines == 1
    assert "line 6" in metrics.malformed_examples[0] and "is not a number" in metrics.malformed_examples[0]


def test_tensorboard_event_files_get_a_clear_error(tmp_path):
    """No TensorBoard reader is a dependency: an event file (or a run folder of them) says what to do instead."""
    run = tmp_path / "runs" / "Dec05_12-00-00_host"
    run.mkdir(parents=True)
    event = run / "events.out.tfevents.1733400000.host.123.0"
    # a TFRecord frame: length, its CRC, then the payload (an Event proto), as the writer starts a file
    event.write_bytes(b"\x18\x00\x00\x00\x00\x00\x00\x00\xa3\x7fK\x22\t\x00\x00\x00\x00\x00\x00\xf0?\x1a\rbrain.Event:2")
    with pytest.raises(LogParseError, match="TensorBoard event file.*export the scalars as CSV"):
        parse_training_log(event)
    with pytest.raises(FileNotFoundError, match="without trainer_state.json.*TensorBoard event files"):
        parse_training_log(tmp_path / "runs")


def test_output_piped_into_a_reader_that_stops_early_is_no_traceback(tmp_path):
    """`analog runs summary A.log | head -1`: the reader is gone before the summary is written."""
    logs = []
    for i in range(3):
        logs.append(str(_write(tmp_path, f"run{i}.log", "".join(f"step={s} loss={1 / s}\n" for s in range(1, 50)))))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "analog", "runs", "summary", *logs], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader stops before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
