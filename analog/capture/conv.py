"""nn.Conv1d and nn.Conv2d, with stride, padding, dilation and groups.

A convolution is a Linear applied at every output position to the unfolded input patch: with
``unfold`` giving patches of shape (B, C_in·k, L), group g sees a_{t,g} = its C_in/groups·k slice of
patch t (plus a one for the bias) and δ_{t,g} = the gradient of its C_out/groups output channels at
position t. ∂L/∂W for group g is Σ_t δ_{t,g} a_{t,g}ᵀ, reshaped to (C_out/groups, C_in/groups, *k).

``padding='same'`` and the padding modes ``reflect``, ``replicate`` and ``circular`` are read as the
layer computes them: the input is first padded with ``F.pad`` by the layer's own
``_reversed_padding_repeated_twice`` (left/right amounts per spatial dimension, the extra one on the
right for an odd total) in the layer's mode, then unfolded without padding.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from analog.capture.rules import LayerRule, append_ones, has_bias, probe_like


def _prepadded(module) -> bool:
    """True when the input is padded explicitly before unfolding ('same'/'valid' or a non-zero mode)."""
    return isinstance(module.padding, str) or module.padding_mode != "zeros"


def _as_2d(module) -> tuple:
    """(kernel, dilation, padding, stride) as 2-D tuples (a Conv1d is a 1 × k Conv2d: no padding on height)."""
    padding = (0,) * len(module.kernel_size) if _prepadded(module) else module.padding
    if isinstance(module, nn.Conv1d):
        (k,), (d,), (p,), (s,) = module.kernel_size, module.dilation, padding, module.stride
        return (1, k), (1, d), (0, p), (1, s)
    return module.kernel_size, module.dilation, padding, module.stride


class _ConvRule(LayerRule):
    def groups(self, module) -> int:
        return module.groups

    def in_dim(self, module) -> int:
        k = 1
        for s in module.kernel_size:
            k *= s
        return module.in_channels // module.groups * k + int(has_bias(module))

    def out_dim(self, module) -> int:
        return module.out_channels // module.groups

    def probe_input(self, module, generator):
        size = [d * (k - 1) + 3 for k, d in zip(module.kernel_size, module.dilation)]
        return probe_like(module, torch.randn(2, module.in_channels, *size, generator=generator))

    def activations(self, module, x):
        if _prepadded(module):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
        kernel, dilation, padding, stride = _as_2d(module)
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·k, L)
        b, _, length = patches.shape
        a = patches.view(b, module.groups, -1, length).permute(0, 3, 1, 2)  # (B, L, G, C/G·k)
        return append_ones(a) if has_bias(module) else a

    def output_grads(self, module, grad_out):
        b, c = grad_out.shape[:2]
        return grad_out.reshape(b, module.groups, c // module.groups, -1).permute(0, 3, 1, 2)

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        b, groups, d_out, _ = grad.shape
        weight_cols = self.in_dim(module) - int(has_bias(module))
        out = {"weight": grad[..., :weight_cols].reshape(b, *module.weight.shape)}
        if has_bias(module):
            out["bias"] = grad[..., -1].reshape(b, groups * d_out)
        return out


class Conv1dRule(_ConvRule, module_type=nn.Conv1d):
    pass


class Conv2dRule(_ConvRule, module_type=nn.Conv2d):
    pass
