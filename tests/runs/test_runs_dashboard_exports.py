"""CSV files downloaded from dashboards: TensorBoard's scalar download (``Wall time,Step,Value``, the
tag only in the file name) and a Weights & Biases panel export (quoted header, ``RUN - metric`` columns
with ``__MIN``/``__MAX``)."""

import pytest

from analog.runs import LogParseError, parse_training_log


def test_tensorboard_scalar_download_takes_the_tag_from_the_file_name(tmp_path):
    losses = [2.5, 2.1, 1.9, 1.75]
    rows = [f"{1700000000.5 + i},{10 * (i + 1)},{loss}" for i, loss in enumerate(losses)]
    train = tmp_path / "run-my_run-tag-train_loss.csv"  # TensorBoard writes the tag train/loss as train_loss
    train.write_text("Wall time,Step,Value\n" + "\n".join(rows) + "\n")
    metrics = parse_training_log(train)
    assert metrics.format == "csv" and metrics.steps == [10, 20, 30, 40] and metrics.loss == losses
    assert metrics.extras == {}  # the wall time is not a metric
    val = tmp_path / "run-my_run-tag-eval_loss.csv"
    val.write_text("Wall time,Step,Value\n1700000003.0,20,2.2\n1700000009.0,40,1.9\n")
    metrics = parse_training_log(val)
    assert metrics.val_steps == [20, 40] and metrics.val_loss == [2.2, 1.9]


def test_wandb_panel_export_with_min_max_columns(tmp_path):
    path = tmp_path / "wandb_export_2026-12-05.csv"
    lines = ['"Step","glad-sun-7 - train/loss","glad-sun-7 - train/loss__MIN","glad-sun-7 - train/loss__MAX"']
    losses = [3.0, 2.4, 2.0]
    for i, loss in enumerate(losses):
        lines.append(f'"{100 * (i + 1)}","{loss}","{loss - 0.5}","{loss + 0.5}"')
    path.write_text("\n".join(lines) + "\n")
    metrics = parse_training_log(path)
    assert metrics.format == "csv" and metrics.steps == [100, 200, 300]
    assert metrics.loss == losses and metrics.extras == {} and metrics.malformed_lines == 0


def test_wandb_export_of_two_runs_is_an_error_naming_them(tmp_path):
    path = tmp_path / "two_runs.csv"
    path.write_text('"Step","a - train/loss","b - train/loss"\n"1","3.0","2.0"\n')
    with pytest.raises(LogParseError, match=r"two_runs.csv as csv: a Weights & Biases export of 2 runs \(a, b\)"):
        parse_training_log(path)
