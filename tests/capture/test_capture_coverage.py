"""Coverage report, exclude filter, frozen modules, and what a block says instead of dropping silently."""

import warnings

import pytest
import torch
from capture_reference import analog_per_sample, assert_grads_match, func_per_sample, make_analog
from torch import nn

B = 4


class Mixed(nn.Module):
    """Linear, a frozen Linear in the middle, an LSTM, a bare parameter, an unused branch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.rnn = nn.LSTM(6, 4, batch_first=True)
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 2)
        self.side = nn.Linear(5, 2)  # runs, but its output is not used by the loss

    def forward(self, x):
        h = torch.tanh(self.frozen(torch.tanh(self.fc1(x))))
        h, _ = self.rnn(h)
        self.side(x)
        return self.head(h * self.scale)


def loss_fn(out, y):
    return ((out - y) ** 2).sum()


def test_coverage_report_names_what_is_not_logged(tmp_path):
    model = Mixed()
    analog = make_analog(tmp_path)
    rnn = r"rnn\.\{weight_ih_l0,weight_hh_l0,bias_ih_l0,bias_hh_l0\} \(recurrent layer\)"
    with pytest.warns(UserWarning, match=rnn):
        analog.watch(model)
    cov = analog.coverage
    assert sorted(analog.modules) == ["fc1", "head", "side"]
    assert cov.frozen == ["frozen"]
    reasons = {u.module: (u.params, u.reason) for u in cov.uncovered}
    assert set(reasons) == {"rnn", ""}
    assert "recurrent" in reasons["rnn"][1]
    assert reasons[""][0] == ("scale",) and "bare nn.Parameter" in reasons[""][1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    covered = sum(p.numel() for m in ("fc1", "head", "side") for p in getattr(model, m).parameters())
    assert (cov.trainable, cov.covered) == (trainable, covered)
    assert abs(cov.share - covered / trainable) < 1e-12
    text = str(cov)
    assert f"{covered:,} of {trainable:,}" in text and "frozen (no trainable parameter, not logged): frozen" in text


def test_exclude_and_explicit_names(tmp_path):
    model = Mixed()
    analog = make_analog(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analog.watch(model, exclude=["side", "rnn"])
    assert sorted(analog.modules) == ["fc1", "head"]
    # what the user excluded is reported but not warned about; the bare parameter still is
    assert [str(w.message) for w in caught if "rnn" in str(w.message)] == []
    assert any("scale" in str(w.message) for w in caught)
    assert {u.module for u in analog.coverage.uncovered} == {"", "rnn", "side"}
    with pytest.raises(TypeError, match="'rnn'.*no rule"):
        make_analog(tmp_path).watch(model, name_filter=["rnn"])


def test_frozen_module_not_logged_and_the_rest_exact(tmp_path):
    torch.manual_seed(0)
    model, x, y = Mixed(), torch.randn(B, 3, 5), torch.randn(B, 3, 2)
    analog = make_analog(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog.watch(model)
    got = analog_per_sample(analog, lambda: loss_fn(model(x), y), B)
    ref = func_per_sample(model, loss_fn, (x,), (y,), names=list(got))
    assert assert_grads_match(got, ref) == 6
    # ``side`` ran but its output does not reach the loss: its logged gradient is zero, exactly
    assert got["side.weight"].abs().max() == 0 and got["fc1.weight"].abs().max() > 0


def test_block_without_backward_warns_with_ids(tmp_path):
    model, x = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)), torch.randn(B, 5)
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.warns(UserWarning, match=r"no gradient reached them.*ids \['a', 'b', 'c', 'd'\] were not logged"):
        with analog(data_id=["a", "b", "c", "d"]):
            loss = model(x).sum()
    loss.backward()  # after the block: changes nothing
    assert analog.get_log()[1] == {}


def test_module_never_called_warns(tmp_path):
    model = nn.ModuleDict({"used": nn.Linear(5, 2), "idle": nn.Linear(5, 2)})
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.warns(UserWarning, match=r"\['idle'\] were not called"):
        with analog(data_id=list(range(B))):
            model["used"](torch.randn(B, 5)).sum().backward()
    assert list(analog.get_log()[1]) == ["used"]


def test_forward_logs_hold_the_input_as_the_layer_saw_it(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(B, 5)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Unflatten(1, (1, 3)), nn.Conv1d(1, 2, 2))
    analog = make_analog(tmp_path, log=["forward"])
    analog.watch(model)
    with analog(data_id=list(range(B))):
        model(x)
    logs = analog.get_log()[1]
    assert torch.equal(logs["0"]["forward"], x)  # no column of ones
    torch.testing.assert_close(logs["3"]["forward"], torch.tanh(model[0](x)).unsqueeze(1))
    assert len(logs) == 2


def test_input_without_batch_dimension_is_an_error(tmp_path):
    """A module whose leading dimension is neither 1 nor the batch is named, with the way out."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(10, 3)
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            bias = self.table(torch.arange(3))  # (3, 3): no batch dimension
            return self.fc(x) + bias.sum(0)

    model = Shared()
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.raises(ValueError, match=r"module 'table' received a batch of 3.*exclude=\['table'\]"):
        with analog(data_id=list(range(B))):
            model(torch.randn(B, 3)).sum().backward()
    with pytest.raises(ValueError, match="every watched module received a batch of 1"):
        with analog(data_id=list(range(B))):
            model.fc(torch.randn(1, 3)).sum().backward()


def test_parametrized_weight_named_as_such(tmp_path):
    """weight_norm (torch.nn.utils.parametrize, as in Wav2Vec2's positional conv): the computed weight's
    gradient is logged; the parameters it is computed from are listed with that reason, not as 'bare'."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Conv1d(3, 4, 3)), nn.Flatten(), nn.Linear(4 * 5, 2))
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="parametrized tensor"):
        analog.watch(model)
    assert set(analog.modules) == {"0", "2"}
    (u,) = analog.coverage.uncovered
    assert u.module == "0.parametrizations.weight" and u.params == ("original0", "original1")
    assert u.numel == 4 + 4 * 3 * 3
    assert "parametrized tensor: 0.weight is computed from these parameters" in u.reason
