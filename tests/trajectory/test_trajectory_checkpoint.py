"""Segment checkpoints: round trip, putting a segment's parameters into the model and restoring
them (also after an exception), and the errors for mismatched models, missing or foreign files."""

import pytest
import torch
from torch import nn
from trajectory_helpers import make_mlp, perturbed

from analog.trajectory.checkpoint import load_checkpoint, parameters_of, save_checkpoint, watched_parameters
from analog.trajectory.layout import SegmentError, SegmentRecord, load_records, write_manifest


def watched(model):
    return {"0": model[0], "2": model[2]}


def test_round_trip_and_size(tmp_path):
    model = make_mlp()
    info = save_checkpoint(tmp_path / "c.safetensors", watched(model), "run-a", 3)
    tensors = load_checkpoint(tmp_path / "c.safetensors", "run-a", 3)
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected) and len(tensors) == 4 == info["tensors"]
    for k, t in tensors.items():
        torch.testing.assert_close(t, expected[k], rtol=0, atol=0)
    assert info["bytes"] == (tmp_path / "c.safetensors").stat().st_size
    assert info["bytes"] >= 4 * sum(p.numel() for p in model.parameters())


def test_parameters_are_put_in_and_restored_with_their_grads(tmp_path):
    model = make_mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    objects = {k: id(v) for k, v in model.named_parameters()}
    model(torch.randn(2, 5)).sum().backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    other = perturbed(model, 0.5, seed=1)
    with parameters_of(watched(model), other):
        for k, v in model.named_parameters():
            torch.testing.assert_close(v.detach(), other[k], rtol=0, atol=0)
            assert v.grad is None
        model(torch.randn(3, 5)).sum().backward()  # a query step's gradients stay inside the block
    params = dict(model.named_parameters())
    assert len(params) == 4
    for k, v in params.items():
        assert id(v) == objects[k]
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)
        torch.testing.assert_close(v.grad, grads[k], rtol=0, atol=0)


def test_parameters_are_restored_after_an_exception():
    model = make_mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(KeyError, match="boom"):
        with parameters_of(watched(model), perturbed(model, 1.0, seed=2)):
            raise KeyError("boom")
    compared = 0
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)
        compared += 1
    assert compared == 4


def test_a_model_with_other_modules_is_refused_and_left_untouched():
    model = make_mlp()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ckpt = {k: v.detach() for k, v in watched_parameters(watched(model)).items()}
    ckpt["1.weight"] = torch.zeros(2)
    with pytest.raises(SegmentError, match=r"only in the checkpoint \['1.weight'\]"):
        with parameters_of(watched(model), ckpt, "segment 2"):
            pass
    wider = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.raises(SegmentError, match=r"parameter '0.weight' has shape \(7, 5\) in the query model"):
        with parameters_of(watched(wider), {k: v.detach() for k, v in model.named_parameters()}):
            pass
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)


def test_missing_and_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(SegmentError, match="segment 1 has no checkpoint .*missing"):
        load_checkpoint(tmp_path / "none.safetensors", "run-a", 1)
    save_checkpoint(tmp_path / "c.safetensors", watched(make_mlp()), "run-b", 1)
    with pytest.raises(SegmentError, match="belongs to run 'run-b'.*different runs are mixed"):
        load_checkpoint(tmp_path / "c.safetensors", "run-a", 1)
    with pytest.raises(SegmentError, match="segment 1, but this is run 'run-b', segment 2"):
        load_checkpoint(tmp_path / "c.safetensors", "run-b", 2)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(SegmentError, match="bad.safetensors cannot be read"):
        load_checkpoint(tmp_path / "bad.safetensors", "run-a", 1)


def test_segment_records_of_another_run_are_refused(tmp_path):
    write_manifest(tmp_path, "run-a", 2)
    SegmentRecord("run-a", 0).save(tmp_path)
    SegmentRecord("run-b", 1).save(tmp_path)  # a segment copied in from another run
    with pytest.raises(SegmentError, match="belongs to run 'run-b' but project .* is run 'run-a'"):
        load_records(tmp_path)
    SegmentRecord("run-a", 1, lr=0.5).save(tmp_path)
    records = load_records(tmp_path)
    assert [r.index for r in records] == [0, 1] and records[1].lr == 0.5
    (tmp_path / "segments" / "0002").mkdir()
    (tmp_path / "segments" / "0002" / "junk").write_text("x")
    with pytest.raises(SegmentError, match="0002 is not listed in .*trajectory.json"):
        load_records(tmp_path)
