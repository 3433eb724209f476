"""Every registered rule against torch.func (vmap(grad)) and a batch-size-1 autograd loop.

The model is a single watched layer followed by a fixed nonlinearity and a per-example loss summed over
the batch (``reduction="sum"``), so analog's logged gradient of example b must equal ∇θ ℓ_b.
"""

import pytest
import torch
import torch.nn.functional as F
from capture_reference import (
    analog_per_sample,
    assert_grads_match,
    func_per_sample,
    loop_per_sample,
    make_analog,
)
from hf_lm_helpers import hf_class
from torch import nn

from analog.capture.embedding import HF_SCALED_EMBEDDINGS

B = 3


class Head(nn.Module):
    """layer -> tanh -> loss against a fixed random target (so output gradients are not trivial)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.tanh(self.layer(x))


def tanh_sum_loss(out, target):
    return ((out - target) ** 2).sum()


def check_layer(tmp_path, layer: nn.Module, x: torch.Tensor, expected_params: int) -> int:
    torch.manual_seed(1)
    model = Head(layer)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    analog = make_analog(tmp_path)
    analog.watch(model)
    got = analog_per_sample(analog, lambda: tanh_sum_loss(model(x), target), B)
    assert len(got) == expected_params, sorted(got)
    n = assert_grads_match(got, func_per_sample(model, tanh_sum_loss, (x,), (target,)))
    n += assert_grads_match(got, loop_per_sample(model, tanh_sum_loss, (x,), (target,)))
    assert n == 2 * expected_params
    return n


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(B, 5), (B, 4, 5), (B, 2, 3, 5)], ids=["2d", "3d", "4d"])
def test_linear(tmp_path, bias, shape):
    torch.manual_seed(0)
    check_layer(tmp_path, nn.Linear(5, 4, bias=bias), torch.randn(*shape), 1 + bias)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1, bias=False),
        dict(kernel_size=2, dilation=2, padding=2, groups=2),
        dict(kernel_size=3, stride=2, dilation=2, groups=4, bias=False),
    ],
    ids=["plain", "stride-pad-nobias", "dilation-groups2", "all-groups4-nobias"],
)
def test_conv1d(tmp_path, kwargs):
    torch.manual_seed(0)
    layer = nn.Conv1d(4, 8, **kwargs)
    check_layer(tmp_path, layer, torch.randn(B, 4, 11), 1 + (layer.bias is not None))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), bias=False),
        dict(kernel_size=2, dilation=(2, 1), padding=1, groups=2),
        dict(kernel_size=3, stride=2, padding=1, dilation=2, groups=4, bias=False),
    ],
    ids=["plain", "stride-pad-nobias", "dilation-groups2", "all-groups4-nobias"],
)
def test_conv2d(tmp_path, kwargs):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, **kwargs)
    check_layer(tmp_path, layer, torch.randn(B, 4, 7, 6), 1 + (layer.bias is not None))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(tmp_path, padding_idx):
    torch.manual_seed(0)
    idx = torch.randint(0, 7, (B, 6))
    idx[:, -2:] = 0  # padding tokens (for padding_idx=0 their rows get no gradient)
    idx[0, 1] = 3
    idx[0, 2] = 3  # a repeated token accumulates
    check_layer(tmp_path, nn.Embedding(7, 5, padding_idx=padding_idx), idx, 1)


def test_embedding_padding_rows_are_zero(tmp_path):
    torch.manual_seed(0)
    model = Head(nn.Embedding(7, 5, padding_idx=0))
    idx = torch.tensor([[0, 1, 2, 0], [3, 0, 0, 0], [4, 5, 6, 1]])
    analog = make_analog(tmp_path)
    analog.watch(model)
    got = analog_per_sample(analog, lambda: model(idx).sum(), B)
    assert got["layer.weight"][:, 0].abs().max() == 0
    assert got["layer.weight"][:, 1:].abs().max() > 0


@pytest.mark.parametrize("shape", [(B, 5), (B, 4, 5)], ids=["2d", "3d"])
def test_hf_conv1d(tmp_path, shape):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(4, 5)  # nf=4 outputs, nx=5 inputs: weight (5, 4)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    check_layer(tmp_path, layer, torch.randn(*shape), 2)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", ["same", 2], ids=["same", "int"])
def test_conv_padding_modes(tmp_path, padding_mode, padding):
    torch.manual_seed(0)
    # even kernel with 'same': the extra padding goes on the right (as torch pads it)
    layer = nn.Conv2d(4, 6, kernel_size=(4, 3), padding=padding, padding_mode=padding_mode, groups=2)
    check_layer(tmp_path, layer, torch.randn(B, 4, 7, 6), 2)
    layer = nn.Conv1d(4, 6, kernel_size=4, padding=padding, padding_mode=padding_mode, dilation=2, bias=False)
    check_layer(tmp_path, layer, torch.randn(B, 4, 11), 1)


@pytest.mark.parametrize("shape,normalized", [((B, 6), 6), ((B, 4, 6), 6), ((B, 3, 4, 6), (4, 6))],
                         ids=["2d", "3d", "2-dim-normalized"])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(tmp_path, shape, normalized, bias):
    torch.manual_seed(0)
    layer = nn.LayerNorm(normalized, bias=bias, eps=1e-3)
    nn.init.normal_(layer.weight)
    check_layer(tmp_path, layer, torch.randn(*shape) * 2 + 1, 1 + bias)


@pytest.mark.parametrize("eps", [None, 1e-4])
def test_rms_norm(tmp_path, eps):
    torch.manual_seed(0)
    layer = nn.RMSNorm(6, eps=eps)
    nn.init.normal_(layer.weight)
    check_layer(tmp_path, layer, torch.randn(B, 4, 6), 1)


@pytest.mark.parametrize("path", __import__("analog.capture.norm", fromlist=["HF_RMS_NORMS"]).HF_RMS_NORMS)
def test_hf_rms_norms(tmp_path, path):
    """Every listed Hugging Face RMSNorm class reuses the RMSNorm rule (the ones this transformers has)."""
    cls = hf_class(path)
    torch.manual_seed(0)
    layer = cls(6, eps=1e-5)
    nn.init.normal_(layer.weight)
    check_layer(tmp_path, layer, torch.randn(B, 4, 6), 1)


@pytest.mark.parametrize("path", HF_SCALED_EMBEDDINGS)
def test_hf_scaled_embeddings(tmp_path, path):
    """Every listed Hugging Face scaled word embedding (lookup × embed_scale) gets the scaled rule."""
    cls = hf_class(path)
    torch.manual_seed(0)
    layer = cls(7, 5, 0, embed_scale=2.5)
    nn.init.normal_(layer.weight)
    idx = torch.randint(0, 7, (B, 6))
    assert torch.allclose(layer(idx), 2.5 * F.embedding(idx, layer.weight))  # what the rule assumes
    check_layer(tmp_path, layer, idx, 1)


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (B, 5)), (nn.BatchNorm1d, (B, 5, 7)),
                                       (nn.BatchNorm2d, (B, 5, 4, 3))], ids=["1d", "1d-seq", "2d"])
def test_batch_norm_eval(tmp_path, cls, shape):
    torch.manual_seed(0)
    layer = cls(5)
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    check_layer(tmp_path, layer.eval(), torch.randn(*shape), 2)


def test_batch_norm_training_is_an_error(tmp_path):
    model = Head(nn.BatchNorm1d(5))
    analog = make_analog(tmp_path)
    analog.watch(model)
    with pytest.raises(RuntimeError, match="'layer'.*training mode"):
        with analog(data_id=list(range(B))):
            model(torch.randn(B, 5)).sum().backward()
    no_stats = Head(nn.BatchNorm1d(5, track_running_stats=False))
    with pytest.raises(ValueError, match="'layer'.*running statistics"):
        make_analog(tmp_path).watch(no_stats, name_filter=["layer"])


def test_all_rules_are_tested():
    """A new rule must get a test here: the registry holds exactly the rules exercised above."""
    from analog.capture import registered_types
    from analog.capture.norm import HF_RMS_NORMS

    assert set(registered_types()) == {
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.conv.Conv1d",
        "torch.nn.modules.conv.Conv2d",
        "torch.nn.modules.sparse.Embedding",
        "transformers.pytorch_utils.Conv1D",
        "torch.nn.modules.normalization.LayerNorm",
        "torch.nn.modules.normalization.RMSNorm",
        "torch.nn.modules.batchnorm._BatchNorm",
        "torch.nn.modules.activation.MultiheadAttention",
        *HF_RMS_NORMS,
        *HF_SCALED_EMBEDDINGS,
    }


class AttentionHead(nn.Module):
    """Self- or cross-attention followed by tanh; masks passed through."""

    def __init__(self, mha, cross=False, key_padding=False, attn_mask=False):
        super().__init__()
        self.mha, self.cross, self.key_padding, self.attn_mask = mha, cross, key_padding, attn_mask

    def forward(self, x, kv, kpm, am):
        kv = kv if self.cross else x
        if not self.mha.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        out, _ = self.mha(x, kv, kv, key_padding_mask=kpm if self.key_padding else None,
                          attn_mask=am if self.attn_mask else None)
        return torch.tanh(out if self.mha.batch_first else out.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross,key_padding,attn_mask,bias", [
    (False, False, False, True), (False, True, True, True), (True, True, False, False), (True, False, True, True),
], ids=["self", "self-masks", "cross-kpm-nobias", "cross-causal"])
def test_multihead_attention(tmp_path, batch_first, cross, key_padding, attn_mask, bias):
    """in_proj_weight/bias and out_proj.weight/bias of nn.MultiheadAttention (out_proj is never called)."""
    torch.manual_seed(0)
    t, s = 5, (7 if cross else 5)
    mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first).eval()
    model = AttentionHead(mha, cross, key_padding, attn_mask)
    x, kv = torch.randn(B, t, 8), torch.randn(B, s, 8)
    kpm = torch.zeros(B, s, dtype=torch.bool)
    kpm[1, -2:] = True
    am = torch.triu(torch.ones(t, s, dtype=torch.bool), 1)
    target = torch.randn(B, t, 8)
    analog = make_analog(tmp_path)
    analog.watch(model)
    assert list(analog.modules) == ["mha"] and analog.coverage.complete
    got = analog_per_sample(analog, lambda: tanh_sum_loss(model(x, kv, kpm, am), target), B)
    assert len(got) == 2 + 2 * bias
    # the reference runs torch's own MultiheadAttention (no analog hooks), one example at a time
    ref = {}
    for i in range(B):
        model.zero_grad(set_to_none=True)
        tanh_sum_loss(model(x[i:i + 1], kv[i:i + 1], kpm[i:i + 1], am), target[i:i + 1]).backward()
        for k, p in model.named_parameters():
            ref.setdefault(k, []).append(p.grad.clone())
    ref = {k: torch.stack(v) for k, v in ref.items()}
    assert assert_grads_match(got, ref) == 2 + 2 * bias
