"""Hooks act only inside ``with analog(...)``, and ``watch`` leaves the model as it was."""

import pytest
import torch
from capture_reference import func_per_sample, make_analog
from torch import nn

B = 4


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(24, 5), nn.Tanh(), nn.Linear(5, 2))
    model[4].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    return model, torch.randn(B, 3, 8), torch.randn(B, 2)


def loss_fn(out, y):
    return ((out - y) ** 2).sum()


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def test_watch_does_not_change_the_model(tmp_path):
    model, _, _ = model_and_data()
    before = [(n, type(m)) for n, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    analog = make_analog(tmp_path)
    analog.watch(model)
    assert sorted(analog.modules) == ["0", "2", "4"]
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert no_hooks(model)


def test_passes_outside_the_block_change_nothing(tmp_path):
    model, x, y = model_and_data()
    analog = make_analog(tmp_path)
    analog.watch(model)
    loss_fn(model(x), y).backward()  # before any block: nothing logged
    with pytest.raises(RuntimeError, match="no log yet"):
        analog.get_log()
    with analog(data_id=list(range(B))):
        assert not no_hooks(model)
        loss_fn(model(x), y).backward()
    assert no_hooks(model)
    ids, logs = analog.get_log()
    snapshot = {n: k["grad"].clone() for n, k in logs.items()}
    assert len(snapshot) == 3
    out = model(x[:2])  # outside: a different batch size would be an error inside
    loss_fn(out, y[:2]).backward()
    ids2, logs2 = analog.get_log()
    assert ids2 == ids and logs2 is logs
    assert all(torch.equal(logs[n]["grad"], snapshot[n]) for n in snapshot)
    # the tensor hook registered inside the block on an output is not left behind either: a backward
    # through a graph built inside the block but run after it adds nothing
    with analog(data_id=list(range(B))):
        late = loss_fn(model(x), y)
    late.backward()
    assert analog.get_log()[1] == {}


def test_exception_inside_the_block_removes_hooks(tmp_path):
    model, x, y = model_and_data()
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.raises(ZeroDivisionError):
        with analog(data_id=list(range(B))):
            loss_fn(model(x), y).backward()
            raise ZeroDivisionError("user code failed inside the block")
    assert no_hooks(model)
    with pytest.raises(ValueError, match="data_id has 4 ids"):
        with analog(data_id=list(range(B))):
            model(x[:3])
    assert no_hooks(model)
    # and the next block works normally
    with analog(data_id=list(range(B))):
        loss_fn(model(x), y).backward()
    logs = analog.get_log()[1]
    ref = func_per_sample(model, loss_fn, (x,), (y,))
    # the frozen bias still has its column in G (analog logs the layer, not only trainable tensors)
    torch.testing.assert_close(logs["4"]["grad"][:, 0, :, :5], ref["4.weight"], atol=1e-5, rtol=1e-4)
    assert len(logs) == 3
