"""Hugging Face Mamba (``MambaForCausalLM``, tiny config, random init, CPU: the torch path of the mixer).

The mixer calls ``in_proj``, ``x_proj`` and ``out_proj`` (and the RMSNorms, the embedding and the tied
``lm_head`` are called as usual), but it uses the weights of ``conv1d`` (handed to ``causal_conv1d_fn``)
and ``dt_proj`` (``dt_proj.weight @ time_step``, the bias inside the selective scan) without calling them,
and ``A_log``/``D`` are bare parameters. analog must log the first group exactly and leave the second out
with its reason (analog.capture.direct_use), never claim it.

Reference: ``torch.func`` per-sample gradients of the same loss (each padded sequence alone), with the tied
``lm_head``/``embeddings`` uses separated (``tie_weights=False``); their sum is checked against the tied one.
Mamba-2 (``conv1d`` used without a call; its gated norm has no rule) and Falcon-Mamba (as Mamba) are checked
against the batch-size-1 autograd loop (``torch.func`` cannot vmap Mamba-2's mask check).
"""

import warnings

import pytest
import torch
from capture_reference import analog_per_sample, func_per_sample, loop_per_sample, make_analog, tied_sums
from hf_lm_helpers import LM, hf_class, lm_loss, padded, randomise_norms
from torch import nn

from analog.capture.direct_use import declared_direct_children

B, T, V, LAYERS = 3, 8, 64, 2
CALLED = ("mixer.in_proj", "mixer.x_proj", "mixer.out_proj", "norm")  # per layer: the layers the mixer calls
DIRECT = ("mixer.conv1d", "mixer.dt_proj")  # per layer: weights used by MambaMixer.forward without a call


def tiny_mamba(family: str = "Mamba", **extra):
    """LM(``{family}ForCausalLM``) of a tiny ``{family}Config`` (seed 0, norms drawn at random)."""
    config = hf_class(f"transformers.{family}Config")(vocab_size=V, hidden_size=16, state_size=4, expand=2,
                                                       conv_kernel=4, num_hidden_layers=LAYERS, pad_token_id=0,
                                                       **(extra or dict(time_step_rank=4)))
    torch.manual_seed(0)
    model = LM(hf_class(f"transformers.{family}ForCausalLM")(config))
    randomise_norms(model)
    return model


def assert_exact(got, ref) -> int:
    """Every logged gradient equals the reference to 1e-4 of the reference's largest entry (a gradient that is
    small throughout, as x_proj's, is held to its own scale); returns how many were compared."""
    for key, value in got.items():
        expected = ref[key]
        assert value.shape == expected.shape, key
        scale = expected.abs().max().item()
        assert scale > 0, f"{key}: the reference gradient is zero, the comparison would prove nothing"
        err = (value - expected).abs().max().item()
        assert err <= 1e-4 * scale, f"{key}: max abs error {err:.3g} (reference max {scale:.3g})"
    return len(got)


def layer_names(suffixes):
    return {f"m.backbone.layers.{i}.{s}" for i in range(LAYERS) for s in suffixes}


def test_mamba_logged_modules_are_exact(tmp_path):
    model = tiny_mamba()
    assert model.m.lm_head.weight is model.m.backbone.embeddings.weight
    ids, mask = padded(B, T, V)
    analog = make_analog(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning (checked in the next test)
        analog.watch(model)
    assert set(analog.modules) == layer_names(CALLED) | {"m.backbone.embeddings", "m.backbone.norm_f", "m.lm_head"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "watched modules were not called" warning: none is watched in vain
        got = analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    ref = func_per_sample(model, lm_loss, (ids, mask), (ids, mask), tie_weights=False)
    # per layer in_proj, x_proj, out_proj, norm (weights only: no biases in this config); embeddings, norm_f, lm_head
    assert assert_exact(got, ref) == 4 * LAYERS + 3
    tied = func_per_sample(model, lm_loss, (ids, mask), (ids, mask))["m.backbone.embeddings.weight"]
    torch.testing.assert_close(got["m.lm_head.weight"] + got["m.backbone.embeddings.weight"], tied,
                               atol=1e-5, rtol=1e-4)


def test_mamba_coverage_names_what_is_left_out(tmp_path):
    model = tiny_mamba()
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="declared by force_accelerate_hooks"):
        analog.watch(model)
    cov = analog.coverage
    by_module = {u.module: u for u in cov.uncovered}
    assert set(by_module) == layer_names(DIRECT) | {f"m.backbone.layers.{i}.mixer" for i in range(LAYERS)}
    for name in layer_names(DIRECT):
        assert by_module[name].params == ("weight", "bias")
        assert "weights used directly by MambaMixer.forward, which never calls this" in by_module[name].reason
    for i in range(LAYERS):
        assert set(by_module[f"m.backbone.layers.{i}.mixer"].params) == {"A_log", "D"}
    left_out = {n for n, _ in model.named_parameters()
                if any(n.startswith(m + ".") for m in layer_names(DIRECT)) or n.endswith((".A_log", ".D"))}
    assert len(left_out) == 6 * LAYERS  # per layer conv1d and dt_proj weight and bias, A_log, D
    total = sum(p.numel() for p in model.parameters())
    assert cov.trainable == total
    assert cov.covered == total - sum(p.numel() for n, p in model.named_parameters() if n in left_out)
    assert sum(cov.watched.values()) == cov.covered


@pytest.mark.parametrize("family, extra, called, direct, no_rule, compared", [
    # Mamba-2: the gated norm (norm(x, gate)) has no rule; lm_head is not tied here
    ("Mamba2", dict(num_heads=4, head_dim=8, n_groups=1, chunk_size=4), ("mixer.in_proj", "mixer.out_proj", "norm"),
     ("mixer.conv1d",), ("mixer.norm",), 3 * LAYERS + 3),
    ("FalconMamba", {}, CALLED, DIRECT, (), 4 * LAYERS + 2),  # lm_head tied to embeddings: one summed gradient
])
def test_mamba_family_logs_exactly_what_it_claims(tmp_path, family, extra, called, direct, no_rule, compared):
    model = tiny_mamba(family, **extra)
    ids, mask = padded(B, T, V)
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="declared by force_accelerate_hooks"):
        analog.watch(model)
    assert set(analog.modules) == layer_names(called) | {"m.backbone.embeddings", "m.backbone.norm_f", "m.lm_head"}
    uncovered = {u.module: u.reason for u in analog.coverage.uncovered}
    assert set(uncovered) == layer_names(direct + no_rule) | {f"m.backbone.layers.{i}.mixer" for i in range(LAYERS)}
    assert all(f"{family}Mixer.forward, which never calls" in uncovered[n] for n in layer_names(direct))
    assert all("no per-sample rule" in uncovered[n] for n in layer_names(no_rule))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    ref = loop_per_sample(model, lm_loss, (ids, mask), (ids, mask))
    assert assert_exact(tied_sums(model, got), ref) == compared


@pytest.mark.parametrize("child", DIRECT)
def test_mamba_refuses_a_directly_used_layer_by_name(tmp_path, child):
    model = tiny_mamba()
    name = f"m.backbone.layers.1.{child}"
    with pytest.raises(ValueError, match=rf"module '{name}' .*cannot be logged: weights used directly by "
                                         "MambaMixer.forward"):
        make_analog(tmp_path).watch(model, name_filter=[name])


def test_declaration_is_read_through_other_wrappers(tmp_path):
    """A toy parent that uses its child's weight in F.linear, marked as Hugging Face marks such a forward under
    another functools.wraps wrapper: the child is left out; its undecorated twin's child is watched (called)."""
    force_accelerate_hooks = hf_class("transformers.integrations.accelerate.force_accelerate_hooks")

    def passthrough(fn):
        def wrapper(self, *args):
            return fn(self, *args)
        wrapper.__wrapped__ = fn
        return wrapper

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(3, 3), nn.Linear(3, 1)

        @passthrough
        @force_accelerate_hooks("lin")
        def forward(self, x):
            return self.out(nn.functional.linear(x, self.lin.weight, self.lin.bias))

    class Called(Direct):
        def forward(self, x):
            return self.out(self.lin(x))

    assert declared_direct_children(Direct) == ("lin",)
    assert declared_direct_children(Called) == ()
    direct, called = make_analog(tmp_path / "d"), make_analog(tmp_path / "c")
    with pytest.warns(UserWarning, match="lin"):
        direct.watch(nn.Sequential(Direct()))
    called.watch(nn.Sequential(Called()))
    assert set(direct.modules) == {"0.out"} and set(called.modules) == {"0.lin", "0.out"}
    assert direct.coverage.covered == 4 and called.coverage.covered == 16
