"""A Hugging Face Trainer output directory: ``trainer_state.json`` lives in each ``checkpoint-N/``
(written by transformers' own ``TrainerState.save_to_json``), not in the directory itself."""

import pytest

from analog.cli import main
from analog.runs import parse_training_log
from analog.runs.comparator import run_name

transformers = pytest.importorskip("transformers")


def _trainer_output(root, checkpoints=(2, 8, 16)):
    """``root/checkpoint-N/trainer_state.json`` holding the log up to step N (loss every 2 steps,
    eval every 4), as the Trainer saves it."""
    history = []
    for step in range(2, max(checkpoints) + 1, 2):
        record = {"epoch": step / 8, "grad_norm": 0.5, "learning_rate": 1e-4, "loss": 5.0 - step / 10}
        history.append({**record, "step": step})
        if step % 4 == 0:
            history.append({"epoch": step / 8, "eval_loss": 5.1 - step / 10, "eval_runtime": 1.0, "step": step})
        for n in checkpoints:
            if n == step:
                folder = root / f"checkpoint-{n}"
                folder.mkdir(parents=True)
                state = transformers.TrainerState(global_step=n, log_history=list(history))
                state.save_to_json(str(folder / "trainer_state.json"))
    return root


def test_output_dir_reads_the_latest_checkpoint_numerically(tmp_path, capsys):
    out = _trainer_output(tmp_path / "my_run")  # lexically checkpoint-8 is last, numerically 16
    metrics = parse_training_log(out)
    assert metrics.source.endswith("checkpoint-16/trainer_state.json")
    assert metrics.steps == list(range(2, 17, 2)) and len(metrics.loss) == 8
    assert metrics.loss[-1] == pytest.approx(5.0 - 1.6)
    assert metrics.val_steps == [4, 8, 12, 16] and metrics.val_loss[-1] == pytest.approx(5.1 - 1.6)
    assert run_name(metrics.source) == run_name(out) == run_name(out / "checkpoint-16") == "my_run"
    assert main(["runs", "summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("my_run (") and "last_step          16" in printed


def test_output_dir_without_any_trainer_state_names_the_folder(tmp_path, capsys):
    (tmp_path / "empty_run" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty_run is a directory without trainer_state.json"):
        parse_training_log(tmp_path / "empty_run")
    assert main(["runs", "summary", str(tmp_path / "empty_run")]) == 1
    assert "empty_run" in capsys.readouterr().err
