"""Checkpoint discovery and loading: every layout, numeric order, safe defaults and clear errors."""

import json

import pytest
import torch
from metrics_fixtures import tiny_state, write_model_file, write_pico_step, write_safetensors

from analog.checkpoints import (
    Checkpoint,
    CheckpointError,
    discover_checkpoints,
    load_model_class,
    load_strict,
    load_tensor_file,
    select_steps,
    step_from_name,
)


def test_step_from_name_uses_last_integer():
    assert step_from_name("checkpoint-1200") == 1200
    assert step_from_name("step_30") == 30
    assert step_from_name("run3_epoch2_step45.pt") == 45
    assert step_from_name("model.safetensors") is None


def test_discovery_orders_numerically_across_layouts(tmp_path):
    torch.save(tiny_state(0), tmp_path / "ckpt_1000.pt")
    torch.save({"state_dict": tiny_state(1)}, tmp_path / "ckpt_200.ckpt")
    write_safetensors(tmp_path / "model_30.safetensors", tiny_state(2))
    hf = tmp_path / "checkpoint-5000"
    hf.mkdir()
    write_safetensors(hf / "model.safetensors", tiny_state(3))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    refs = discover_checkpoints(tmp_path)
    assert [r.step for r in refs] == [30, 200, 1000, 5000]
    assert [r.layout for r in refs] == ["file", "file", "file", "folder"]


@pytest.mark.parametrize("nest", [None, "state_dict", "model_state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_nested_state_dicts_are_unwrapped(tmp_path, nest, suffix):
    state = tiny_state(4)
    obj = state if nest is None else {nest: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / f"step_5{suffix}")
    loaded = load_tensor_file(tmp_path / f"step_5{suffix}")
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_safetensors_are_read_lazily_tensor_by_tensor(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", tiny_state(5))
    lazy = load_tensor_file(tmp_path / "a.safetensors")
    assert not isinstance(lazy, dict)
    assert len(lazy) == 4 and torch.equal(lazy["fc1.weight"], tiny_state(5)["fc1.weight"])


def test_sharded_hf_folder_is_merged(tmp_path):
    folder = tmp_path / "step-7"
    folder.mkdir()
    state = tiny_state(6)
    write_safetensors(folder / "model-00001-of-00002.safetensors", {k: state[k] for k in ("fc1.weight", "fc1.bias")})
    write_safetensors(folder / "model-00002-of-00002.safetensors", {k: state[k] for k in ("fc2.weight", "fc2.bias")})
    weight_map = {k: f"model-0000{1 if k.startswith('fc1') else 2}-of-00002.safetensors" for k in state}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (ref,) = discover_checkpoints(tmp_path)
    with Checkpoint(ref) as ckpt:
        assert sorted(ckpt.state_dict()) == sorted(state)


def test_pico_layout_reads_each_data_type_and_split(tmp_path):
    for step in (20, 3):
        write_pico_step(tmp_path, step, seed=step)
    refs = discover_checkpoints(tmp_path)
    assert [(r.step, r.layout) for r in refs] == [(3, "pico"), (20, "pico")]
    with Checkpoint(refs[0]) as ckpt:
        assert ckpt.tensors("activations", "val")["model.0.mlp"].shape == (64, 8)
        assert ckpt.tensors("gradients", "val")["model.1.mlp"].shape == (8, 8)
        with pytest.raises(CheckpointError, match=r"step 3: no activations for split 'train'"):
            ckpt.tensors("activations", "train")


def test_pickled_code_needs_the_explicit_flag(tmp_path):
    path = tmp_path / "step_1.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_tensor_file(path)
    assert sorted(load_tensor_file(path, allow_pickle=True)) == ["bias", "weight"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_or_truncated_checkpoint_names_the_file(tmp_path, damage, suffix):
    path = tmp_path / f"step_9{suffix}"
    if suffix == ".pt":
        torch.save(tiny_state(7), path)
    else:
        write_safetensors(path, tiny_state(7))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00garbage" * 20)
    with pytest.raises(CheckpointError, match="step_9"):
        data = load_tensor_file(path)
        [data[k] for k in data]


def test_empty_or_missing_directory_and_missing_step(tmp_path):
    with pytest.raises(ValueError, match=f"no checkpoints found in {tmp_path}"):
        discover_checkpoints(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        discover_checkpoints(tmp_path / "nope")
    torch.save(tiny_state(0), tmp_path / "step_10.pt")
    refs = discover_checkpoints(tmp_path)
    with pytest.warns(UserWarning, match=r"step\(s\) \[11\] not found.*available steps: 10.*Skipping"):
        assert [r.step for r in select_steps(refs, [10, 11])] == [10]  # pico-analyze warns and skips
    with pytest.raises(ValueError, match=r"step\(s\) \[11\] not found"):
        select_steps(refs, [10, 11], on_missing="error")
    with pytest.raises(ValueError, match=r"step\(s\) \[11, 12\] not found"):
        select_steps(refs, [11, 12])  # nothing left to analyse


def test_duplicate_step_is_an_error(tmp_path):
    torch.save(tiny_state(0), tmp_path / "step_10.pt")
    write_safetensors(tmp_path / "ckpt-10.safetensors", tiny_state(0))
    with pytest.raises(ValueError, match="two checkpoints for step 10"):
        discover_checkpoints(tmp_path)


def test_strict_model_loading_names_missing_and_unexpected_keys(tmp_path):
    cls = load_model_class(write_model_file(tmp_path))
    assert cls.__name__ == "TinyNet"
    model = cls()
    state = tiny_state(8)
    load_strict(model, state, "step 1")
    assert torch.equal(model.fc1.weight, state["fc1.weight"])
    broken = dict(state)
    del broken["fc2.bias"]
    broken["extra.weight"] = torch.zeros(1)
    before = model.fc1.weight.clone()
    with pytest.raises(CheckpointError, match=r"missing keys: fc2.bias.*unexpected keys: extra.weight"):
        load_strict(model, {**broken, "fc1.weight": torch.zeros(5, 6)}, "step 2")
    assert torch.equal(model.fc1.weight, before)
    with pytest.raises(CheckpointError, match="shape mismatches: fc1.weight"):
        load_strict(model, {**state, "fc1.weight": torch.zeros(6, 6)}, "step 3")
