"""Checkpoints as training scripts save them: weights beside the optimizer state, the step, the
parsed ``argparse`` arguments, paths and NumPy values. These load with ``weights_only=True``
(no --allow-pickle); code in a pickle is still refused and never run."""

import argparse
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from analog.checkpoints import discover_checkpoints
from analog.checkpoints.loading import CheckpointError, load_tensor_file
from analog.cli import main


def _train_and_save(folder, steps=(10, 20, 30)):
    """A small loop saving ``{"model", "optimizer", "step", "args", "rng", "best", "out_dir"}``."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = argparse.Namespace(lr=1e-2, batch_size=16, name="demo", out_dir=pathlib.Path(folder))
    saved = {}
    for step in range(1, max(steps) + 1):
        loss = model(torch.randn(16, 6)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "args": args,
                    "rng": np.random.get_state(),
                    "best": np.float64(loss.item()),
                    "history": np.array([1.0, 0.5]),
                    "out_dir": pathlib.Path(folder) / "ckpt",
                },
                folder / f"ckpt_{step}.pt",
            )
            saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return saved


def test_script_checkpoints_load_without_allow_pickle(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    saved = _train_and_save(folder)
    assert [r.step for r in discover_checkpoints(folder)] == [10, 20, 30]
    for step, weights in saved.items():
        tensors = load_tensor_file(folder / f"ckpt_{step}.pt")
        assert sorted(tensors) == sorted(weights)
        assert all(torch.equal(tensors[k], weights[k]) for k in weights)
    out = tmp_path / "out"
    assert main(["metrics", "--dir", str(folder), "--metrics", "weight_norm", "--output-dir", str(out), "--quiet"]) == 0
    rows = (out / "checkpoint_metrics" / "metrics.csv").read_text().splitlines()[1:]
    compared = 0
    for row in rows:
        step, _, component, layer, value = row.split(",")
        if component != "simple:weights":
            continue
        key = layer[: -len(".weights")]
        key = key if key.endswith(".bias") else key + ".weight"
        assert float(value) == pytest.approx(float(saved[int(step)][key].double().norm()), rel=1e-12)
        compared += 1
    assert compared == 3 * 4


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling would create the file: code a checkpoint must not run
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_code_in_a_pickle_is_still_refused_and_not_run(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "step_1.pt"
    torch.save({"model": {"w": torch.ones(2, 2)}, "hook": _Marker(marker)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_tensor_file(path)
    assert not marker.exists()
    module_path = tmp_path / "step_2.pt"
    torch.save({"model": nn.Linear(2, 2)}, module_path)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        load_tensor_file(module_path)


def test_a_state_dict_under_another_key_is_found_and_two_are_an_error(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    torch.save({"net": model.state_dict(), "opt": optimizer.state_dict(), "epoch": 2}, tmp_path / "step_1.pt")
    loaded = load_tensor_file(tmp_path / "step_1.pt")
    assert sorted(loaded) == ["bias", "weight"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    torch.save({"net": model.state_dict(), "ema": model.state_dict(), "opt": optimizer.state_dict()}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt: .*several dicts of tensors under 'net', 'ema'"):
        load_tensor_file(tmp_path / "a.pt")
