"""ParameterSnapshot / ParameterDelta: immutability and statistics against direct computation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from analog.monitor import ParameterDelta, ParameterSetMismatch, ParameterSnapshot


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _perturb(model, seed=1, scale=1e-3, zero_fraction=0.3):
    """Add random changes, leaving about ``zero_fraction`` of entries untouched."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            change = torch.randn(param.shape, generator=generator) * scale
            keep = torch.rand(param.shape, generator=generator) > zero_fraction
            param.add_(change * keep)


def test_snapshot_copies_and_is_immutable():
    model = _model()
    snap = ParameterSnapshot.capture(model, dtype="float64", step=7)
    assert snap.step == 7 and len(snap) == 4
    assert snap.numel == sum(p.numel() for p in model.parameters())
    assert snap.nbytes == snap.numel * 8
    for name, param in model.named_parameters():
        assert snap[name].dtype == torch.float64
        assert snap[name].data_ptr() != param.data_ptr()
    with pytest.raises(AttributeError):
        snap.step = 3
    with pytest.raises(TypeError):
        snap.tensors["0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown snapshot dtype"):
        ParameterSnapshot.capture(model, dtype="int8")


def test_delta_statistics_match_direct_computation():
    model = _model()
    old = ParameterSnapshot.capture(model, step=0)
    _perturb(model)
    new = ParameterSnapshot.capture(model, step=5)
    delta = ParameterDelta.between(old, new)
    flat = np.concatenate(
        [(p.detach().numpy().astype(np.float64) - old[n].numpy()).ravel() for n, p in model.named_parameters()]
    )
    assert delta.numel == flat.size == 6 * 5 + 5 + 5 * 3 + 3
    assert (delta.old_step, delta.new_step) == (0, 5)
    assert delta.norm_l2 == pytest.approx(math.sqrt((flat**2).sum()), rel=1e-6)
    assert delta.norm_l1 == pytest.approx(np.abs(flat).sum(), rel=1e-6)
    assert delta.norm_max == pytest.approx(np.abs(flat).max(), rel=1e-6)
    assert delta.mean == pytest.approx(flat.mean(), rel=1e-5, abs=1e-12)
    assert delta.std == pytest.approx(flat.std(ddof=1), rel=1e-5)
    for threshold in (0.0, 1e-4, 1e-3):
        assert delta.count_at_most(threshold) == int((np.abs(flat) <= threshold).sum())
        assert delta.sparsity(threshold) == pytest.approx((np.abs(flat) <= threshold).mean())
    assert 0.1 < delta.sparsity(0.0) < 0.6


def test_delta_rejects_changed_parameter_set():
    model = _model()
    old = ParameterSnapshot.capture(model)
    model.append(nn.Linear(3, 2))
    with pytest.raises(ParameterSetMismatch, match=r"added: 3\.bias, 3\.weight"):
        ParameterDelta.between(old, ParameterSnapshot.capture(model))
    other = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ParameterSetMismatch, match=r"reshaped: 0\.bias, 0\.weight"):
        ParameterDelta.between(old, ParameterSnapshot.capture(other))
