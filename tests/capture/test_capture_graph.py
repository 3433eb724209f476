"""Masks, weight sharing, gradient checkpointing and torch.compile against torch.func / a batch-1 loop.

What a mask means (analog.capture.masks): it never changes a logged gradient — the logged gradient of
example b is the gradient of the loss the user backpropagates, mask or not. It reaches only the
statistics (the factors handed to the curvature observer are zero at masked positions).
"""

import pytest
import torch
import torch.utils.checkpoint as ckpt
from capture_reference import (
    analog_per_sample,
    assert_grads_match,
    func_per_sample,
    loop_per_sample,
    make_analog,
)
from torch import nn

from analog.capture import find_rule
from analog.capture.hooks import Capture
from analog.compression.base import NoProjector

B, T = 4, 5


class PositionWise(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def masked_loss(out, target, mask):
    return (((out - target) ** 2).sum(-1) * mask).sum()


def full_loss(out, target):
    return ((out - target) ** 2).sum()


def test_mask_never_changes_the_gradient(tmp_path):
    torch.manual_seed(0)
    model, x, y = PositionWise(), torch.randn(B, T, 6), torch.randn(B, T, 3)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1] = 0
    mask[3, :] = 0
    analog = make_analog(tmp_path)
    analog.watch(model)
    for loss, ref_args in ((full_loss, (y,)), (masked_loss, (y, mask))):
        got = analog_per_sample(analog, lambda: loss(model(x), *ref_args), B, mask=mask)  # noqa: B023
        n = assert_grads_match(got, func_per_sample(model, loss, (x,), ref_args))
        n += assert_grads_match(got, loop_per_sample(model, loss, (x,), ref_args))
        assert n == 8
    # the masked loss gives example 3 no gradient, the unmasked one does: the mask alone removed nothing
    assert all(g[3].abs().max() == 0 for g in got.values())


def test_mask_reaches_only_the_statistics():
    """The observer (curvature statistics) gets factors zeroed at masked positions, nothing else changes."""
    torch.manual_seed(0)
    model, x, y = PositionWise(), torch.randn(B, T, 6), torch.randn(B, T, 3)
    mask = (torch.rand(B, T) > 0.4).float()
    seen = {}
    rules = {"fc1": find_rule(model.fc1), "fc2": find_rule(model.fc2)}
    modules = {"fc1": model.fc1, "fc2": model.fc2}
    with Capture(modules, rules, NoProjector(), ("grad",), batch_size=B, mask=mask,
                 observer=lambda n, a, d, m: seen.setdefault(n, (a, d, m))) as cap:
        h = torch.tanh(model.fc1(x))
        full_loss(model.fc2(h), y).backward()
    cap.finish(list(range(B)))
    a1, d1, m1 = seen["fc1"]
    expected_a = torch.cat([x, torch.ones(B, T, 1)], -1) * mask[..., None]
    torch.testing.assert_close(a1[:, :, 0], expected_a)
    assert torch.equal(m1, mask)
    assert d1[mask == 0].abs().max() == 0 and d1[mask == 1].abs().max() > 0
    assert len(seen) == 2


def test_bool_mask_equals_float_mask(tmp_path):
    torch.manual_seed(0)
    model, x, y = PositionWise(), torch.randn(B, T, 6), torch.randn(B, T, 3)
    mask = torch.rand(B, T) > 0.4
    analog = make_analog(tmp_path, hessian="kfac")
    analog.watch(model)
    got = analog_per_sample(analog, lambda: full_loss(model(x), y), B, mask=mask)
    assert assert_grads_match(got, func_per_sample(model, full_loss, (x,), (y,))) == 4


def test_mask_of_wrong_shape_is_an_error(tmp_path):
    model, x = PositionWise(), torch.randn(B, T, 6)
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.raises(ValueError, match="mask of shape"):
        with analog(data_id=list(range(B)), mask=torch.ones(B, T + 1)):
            model(x).sum().backward()


def test_mask_that_fits_no_module_is_an_error(tmp_path):
    """A model without positions (one vector per example): a mask cannot apply and is refused."""
    model, x = PositionWise(), torch.randn(B, 6)
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.raises(ValueError, match="no watched module has positions"):
        with analog(data_id=list(range(B)), mask=torch.ones(B, T)):
            model(x).sum().backward()


def test_masks_per_side(tmp_path):
    """A dict of name patterns gives each side its own mask; a pattern matching nothing is an error."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"encoder": nn.Linear(6, 6), "decoder": nn.Linear(6, 6)})
    xe, xd = torch.randn(B, T, 6), torch.randn(B, T + 2, 6)
    me, md = torch.ones(B, T), torch.ones(B, T + 2)
    md[0, -2:] = 0
    seen = {}
    rules = {n: find_rule(m) for n, m in model.items()}
    with Capture(dict(model.items()), rules, NoProjector(), ("grad",), batch_size=B,
                 mask={"encoder": me, "decoder": md}, observer=lambda n, a, d, m: seen.setdefault(n, m)) as cap:
        (model["encoder"](xe).sum() + model["decoder"](xd).sum()).backward()
    cap.finish(None)
    assert seen["encoder"] is me and seen["decoder"] is md
    with pytest.raises(ValueError, match=r"\['cross'\] match no watched module"):
        Capture(dict(model.items()), rules, NoProjector(), ("grad",), mask={"encoder": me, "cross": md})


class Shared(nn.Module):
    """One Linear used twice (and an Embedding used twice) in one forward pass."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, idx):
        h = self.emb(idx) + 0.5 * self.emb(idx.flip(-1))
        h = torch.tanh(self.block(h))
        h = torch.tanh(self.block(h))
        return self.out(h.mean(1))


def test_module_used_twice_accumulates(tmp_path):
    torch.manual_seed(0)
    model, idx, y = Shared(), torch.randint(0, 9, (B, T)), torch.randn(B, 2)
    analog = make_analog(tmp_path)
    analog.watch(model)
    got = analog_per_sample(analog, lambda: full_loss(model(idx), y), B)
    n = assert_grads_match(got, func_per_sample(model, full_loss, (idx,), (y,)))
    n += assert_grads_match(got, loop_per_sample(model, full_loss, (idx,), (y,)))
    assert n == 2 * 5


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant=None):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.use_reentrant = use_reentrant

    def body(self, x):
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))

    def forward(self, x):
        if self.use_reentrant is None:
            return self.fc3(self.body(x))
        return self.fc3(ckpt.checkpoint(self.body, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(tmp_path, use_reentrant):
    """The recomputed forward inside backward must not count a call twice (nor drop one).

    torch.func cannot differentiate through checkpoint's saved-tensor hooks, so the reference is the
    same weights without checkpointing (checkpointing does not change the math). The reentrant variant
    needs an input that requires grad: otherwise PyTorch itself gives the checkpointed weights no gradient.
    """
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant)
    plain = Checkpointed(None)
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(B, T, 6).requires_grad_(), torch.randn(B, T, 3)
    mask = (torch.rand(B, T) > 0.3).float()
    analog = make_analog(tmp_path)
    analog.watch(model)
    got = analog_per_sample(analog, lambda: full_loss(model(x), y), B)
    n = assert_grads_match(got, func_per_sample(plain, full_loss, (x.detach(),), (y,)))
    n += assert_grads_match(got, loop_per_sample(model, full_loss, (x,), (y,)))
    assert n == 2 * 6
    got = analog_per_sample(analog, lambda: masked_loss(model(x), y, mask), B, mask=mask)
    assert assert_grads_match(got, func_per_sample(plain, masked_loss, (x.detach(),), (y, mask))) == 6


def test_torch_compile(tmp_path):
    """A model compiled (inductor, the default backend) and run *before* the ``with`` block.

    Dynamo does not guard compiled graphs on module hooks by default, so without analog's guard the
    compiled graph from outside the block would run inside it without hooks and log nothing. Steps
    outside and inside the block alternate: each must match the eager references / change nothing.
    """
    torch.manual_seed(0)
    model, x, y = PositionWise(), torch.randn(B, T, 6), torch.randn(B, T, 3)
    mask = (torch.rand(B, T) > 0.3).float()
    ref = func_per_sample(model, full_loss, (x,), (y,))
    compiled = torch.compile(model)
    full_loss(compiled(x), y).backward()  # compiled and run without hooks first
    model.zero_grad()
    analog = make_analog(tmp_path)
    analog.watch(model)
    for _ in range(2):
        assert assert_grads_match(analog_per_sample(analog, lambda: full_loss(compiled(x), y), B), ref) == 4
        full_loss(compiled(x), y).backward()  # outside: no hooks, no new log
        model.zero_grad()
    got = analog_per_sample(analog, lambda: masked_loss(compiled(x), y, mask), B, mask=mask)
    assert assert_grads_match(got, func_per_sample(model, masked_loss, (x,), (y, mask))) == 4
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks
