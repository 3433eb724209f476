"""nn.Linear and Hugging Face's GPT-2 ``Conv1D`` (a Linear whose weight is stored transposed).

y = x Wᵀ + b with x of shape (B, *, d_in): every leading dimension after the batch is a position,
so a = x reshaped to (B, T, 1, d_in) [+ ones], δ = ∂L/∂y reshaped to (B, T, 1, d_out), and
∂L/∂W_b = Σ_t δ_t a_tᵀ (d_out × d_in).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from analog.capture.rules import LayerRule, append_ones, has_bias, probe_like


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(B, *, d) -> (B, T, 1, d) with T the product of the middle dimensions (1 for 2-D input)."""
    return x.reshape(x.shape[0], -1, 1, x.shape[-1])


def _project(module, x: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
    """[x, 1] P_in = x P_in[:-1] + P_in[-1] with a bias: the column of ones is never materialised."""
    if not has_bias(module):
        return _positions(x) @ p_in
    return torch.addmm(p_in[-1], x.reshape(-1, x.shape[-1]), p_in[:-1]).view(x.shape[0], -1, 1, p_in.shape[-1])


class LinearRule(LayerRule, module_type=nn.Linear):
    channels_last = True

    def in_dim(self, module: nn.Linear) -> int:
        return module.in_features + int(has_bias(module))

    def probe_input(self, module, generator):
        return probe_like(module, torch.randn(2, 3, self.in_dim(module) - int(has_bias(module)), generator=generator))

    def out_dim(self, module: nn.Linear) -> int:
        return module.out_features

    def activations(self, module, x):
        a = _positions(x)
        return append_ones(a) if has_bias(module) else a

    def project_activations(self, module, x, p_in):
        return _project(module, x, p_in)

    def output_grads(self, module, grad_out):
        return _positions(grad_out)

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        g = grad[:, 0]
        out = {"weight": g[..., : module.in_features]}
        if has_bias(module):
            out["bias"] = g[..., -1]
        return out


class HFConv1DRule(LinearRule, module_type="transformers.pytorch_utils.Conv1D"):
    """GPT-2's Conv1D: y = x W + b with W of shape (d_in, d_out); its gradient is Gᵀ."""

    def in_dim(self, module) -> int:
        return module.weight.shape[0] + int(has_bias(module))

    def out_dim(self, module) -> int:
        return module.weight.shape[1]

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        g = grad[:, 0]
        out = {"weight": g[..., : module.weight.shape[0]].transpose(1, 2)}
        if has_bias(module):
            out["bias"] = g[..., -1]
        return out
