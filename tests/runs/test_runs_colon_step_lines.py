"""``iter N: loss x, ...`` / ``step N: train loss x, val loss y`` lines, in the order nanoGPT's
train.py prints them (the evaluation of step N before the ``iter N`` line of the same step)."""

import math

import pytest

from analog.runs import parse_training_log


def _nanogpt_log(losses, eval_interval=4):
    """The lines nanoGPT's loop prints: at a multiple of eval_interval the evaluation first, then the
    iteration; returns the text and the expected (val_steps, val_losses, estimated_train_losses)."""
    lines, val_steps, val_losses, estimates = ["Overriding: max_iters = 12", "number of parameters: 0.80M"], [], [], {}
    for step, loss in enumerate(losses):
        if step % eval_interval == 0:
            train_estimate, val = loss + 0.01, loss + 0.05
            lines.append(f"step {step}: train loss {train_estimate:.4f}, val loss {val:.4f}")
            val_steps.append(step)
            val_losses.append(round(val, 4))
            estimates[step] = round(train_estimate, 4)
        lines.append(f"iter {step}: loss {loss:.4f}, time {100 + step:.2f}ms, mfu {3 + step / 100:.2f}%")
    return "\n".join(lines) + "\n", val_steps, val_losses, estimates


def test_nanogpt_lines_keep_every_value_on_its_step(tmp_path):
    losses = [4.2 - 0.15 * i for i in range(12)]
    text, val_steps, val_losses, estimates = _nanogpt_log(losses)
    path = tmp_path / "train.log"
    path.write_text(text, encoding="utf-8")
    metrics = parse_training_log(path)
    assert metrics.format == "text" and metrics.malformed_lines == 0 and metrics.resumed_records == 0
    assert metrics.steps == list(range(12))
    assert metrics.loss == [round(x, 4) for x in losses]
    assert metrics.extras["time_ms"] == [100.0 + s for s in range(12)]
    assert metrics.extras["mfu"] == pytest.approx([3 + s / 100 for s in range(12)])
    assert metrics.val_steps == val_steps == [0, 4, 8] and metrics.val_loss == val_losses
    compared = 0
    for step, value in zip(metrics.steps, metrics.extras["estimated_train_loss"]):
        if step in estimates:
            assert value == estimates[step]
            compared += 1
        else:
            assert math.isnan(value)
    assert compared == 3


def test_last_evaluation_without_its_iteration_and_bad_fields(tmp_path):
    path = tmp_path / "run.log"
    path.write_text(
        "iter 0: loss 4.0, time 10ms\n"
        "iter 1: loss oops, time 10ms\n"
        "Step 2: loss 3.5, lr 1e-3\n"
        "step 3: train loss 3.3, val loss 3.4\n",
        encoding="utf-8",
    )
    metrics = parse_training_log(path)
    assert metrics.steps == [0, 2] and metrics.loss == [4.0, 3.5] and metrics.lr[1] == 1e-3
    assert metrics.val_steps == [3] and metrics.val_loss == [3.4]
    assert metrics.malformed_lines == 1 and "loss: 'oops' is not a number" in metrics.malformed_examples[0]
