"""Checkpoints as training frameworks write them: Lightning/DDP/compile key prefixes, and the errors a
comparative metric gives on them (naming the step and the layer)."""

import contextlib
import csv
import sys

import pytest
import torch
from metrics_fixtures import tiny_state, write_model_file

from analog.checkpoints import CheckpointError, discover_checkpoints, load_model_class, load_strict
from analog.cli import main

#: a model metric whose value is checked against the checkpoint itself
CUSTOM = "def fc1_sum_of_model(model):\n    return float(model.fc1.weight.detach().double().sum())\n"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "wrap",
    [
        # Lightning: LightningModule with self.model, saved with epoch/optimizer state beside it
        lambda s, step: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "epoch": 1, "global_step": step,
                         "optimizer_states": [{"state": {}, "param_groups": []}]},
        # DDP's module. prefix, in a dict with model/optimizer/step keys
        lambda s, step: {"model": {f"module.{k}": v for k, v in s.items()}, "optimizer": {}, "step": step},
        # torch.compile of a DDP model
        lambda s, step: {f"_orig_mod.module.{k}": v for k, v in s.items()},
    ],
    ids=["lightning", "ddp", "compiled_ddp"],
)
def test_model_metric_loads_wrapped_keys(tmp_path, wrap):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    states = {step: tiny_state(step) for step in (5, 10, 15)}
    for step, state in states.items():
        torch.save(wrap(state, step), ckpts / f"epoch=0-step={step}.ckpt")
    custom = tmp_path / "custom.py"
    custom.write_text(CUSTOM)
    out = tmp_path / "out"
    args = ["metrics", "--dir", str(ckpts), "--custom-metrics", str(custom), "--model", str(write_model_file(tmp_path)),
            "--output-dir", str(out), "--quiet"]
    assert main(args) == 0
    rows = _rows(out / "checkpoint_metrics" / "metrics.csv")
    assert len(rows) == 3
    for row in rows:
        expected = float(states[int(row["step"])]["fc1.weight"].double().sum())
        assert float(row["value"]) == pytest.approx(expected, rel=1e-12)


def test_prefix_is_stripped_only_when_the_keys_then_match(tmp_path):
    model = load_model_class(write_model_file(tmp_path))()
    state = tiny_state(1)
    # another model behind the prefix: still an error, listing the checkpoint's own keys
    other = {f"model.{k}": v for k, v in state.items() if k != "fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys: fc1.bias.*unexpected keys: model.fc1.bias"):
        load_strict(model, other, "step 1")
    # a prefix that not every key carries is not a wrapper
    mixed = {**{f"model.{k}": v for k, v in state.items() if k.startswith("fc1")},
             **{k: v for k, v in state.items() if k.startswith("fc2")}}
    with pytest.raises(CheckpointError, match="unexpected keys: model.fc1.bias, model.fc1.weight"):
        load_strict(model, mixed, "step 1")
    load_strict(model, {f"module.{k}": v for k, v in state.items()}, "step 1")
    assert torch.equal(model.fc2.bias, state["fc2.bias"])


def test_comparative_error_names_step_and_layer(tmp_path, capsys):
    """PWCCA on square weights has too few samples (rows): the error says where, not only what."""
    g = torch.Generator().manual_seed(0)
    for step in (1, 2):
        torch.save({"a.weight": torch.randn(8, 8, generator=g)}, tmp_path / f"step_{step}.pt")
    assert main(["metrics", "--dir", str(tmp_path), "--metrics", "pwcca", "--target-step", "2", "--output-dir",
                 str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "CCA needs more samples" in err and "step 1" in err and "a.weight" in err and "target step 2" in err


def test_lightning_and_descriptive_file_names_give_the_training_step(tmp_path):
    """Lightning's ModelCheckpoint writes `epoch=E-step=S.ckpt`, `-v1` on a name clash and `last.ckpt`."""
    names = {"epoch=0-step=100.ckpt": 100, "epoch=1-step=200-v1.ckpt": 200, "step_300_loss_0.5.pt": 300,
             "global_step400.pt": 400}
    for i, name in enumerate(names):
        torch.save({"state_dict": tiny_state(i)}, tmp_path / name)
    torch.save({"state_dict": tiny_state(9)}, tmp_path / "last-v1.ckpt")
    torch.save({"state_dict": tiny_state(9)}, tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="without a step number in their name: last-v1.ckpt, last.ckpt"):
        refs = discover_checkpoints(tmp_path)
    assert [(r.path.name, r.step) for r in refs] == sorted(names.items(), key=lambda item: item[1])


def test_optimizer_and_scheduler_files_are_not_read_as_weights(tmp_path):
    """`step_N/{model,optimizer,scheduler}.pt` folders, and `model_N.pt` beside `optimizer_N.pt`."""
    states = {step: tiny_state(step) for step in (1, 2)}
    folders, flat = tmp_path / "folders", tmp_path / "flat"
    flat.mkdir()
    for step, state in states.items():
        folder = folders / f"step_{step}"
        folder.mkdir(parents=True)
        params = [torch.nn.Parameter(v.clone()) for v in state.values()]
        opt = torch.optim.Adam(params)
        sum(p.sum() for p in params).backward()
        opt.step()
        torch.save(state, folder / "model.pt")
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
        torch.save(torch.get_rng_state(), folder / "rng_state.pth")
        torch.save(state, flat / f"model_{step}.pt")
        torch.save(opt.state_dict(), flat / f"optimizer_{step}.pt")
    for run in (folders, flat):
        out = tmp_path / f"out_{run.name}"
        with pytest.warns(UserWarning, match="optimizer_1.pt") if run is flat else contextlib.nullcontext():
            assert main(["metrics", "--dir", str(run), "--metrics", "frobenius", "--output-dir", str(out),
                         "--quiet"]) == 0
        rows = [r for r in _rows(out / "checkpoint_metrics" / "metrics.csv") if r["component"] != "whole_model"]
        assert len(rows) == 2 * 4
        for row in rows:
            key = row["layer"][: -len(".weights")]
            key = key if key in states[1] else key + ".weight"
            assert float(row["value"]) == pytest.approx(float(states[int(row["step"])][key].double().norm()), rel=1e-12)
    with pytest.warns(UserWarning, match="skipped optimizer/scheduler/training-state files.*optimizer_1.pt"):
        assert [r.step for r in discover_checkpoints(flat)] == [1, 2]


def test_model_and_custom_metric_files_leave_no_bytecode_beside_them(tmp_path, monkeypatch):
    """Only --output-dir is written: importing the user's .py files writes no __pycache__ next to them."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    src, ckpts = tmp_path / "src", tmp_path / "ckpts"
    src.mkdir()
    ckpts.mkdir()
    torch.save(tiny_state(0), ckpts / "step_1.pt")
    (src / "custom.py").write_text(CUSTOM)
    out = tmp_path / "out"
    assert main(["metrics", "--dir", str(ckpts), "--custom-metrics", str(src / "custom.py"), "--model",
                 str(write_model_file(src)), "--output-dir", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in src.iterdir()) == ["custom.py", "tiny_model.py"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_1.pt"]
    assert sys.dont_write_bytecode is False
