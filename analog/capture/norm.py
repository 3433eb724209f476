"""Elementwise-affine layers: LayerNorm, RMSNorm (torch's and Hugging Face's) and BatchNorm in eval mode.

Each of these computes y_{t,i} = x̂_{t,i} γ_i (+ β_i) from a normalised input x̂ that, for one example,
depends only on that example. Per channel i the per-sample gradient is

    ∂ℓ/∂γ_i = Σ_t δ_{t,i} x̂_{t,i},        ∂ℓ/∂β_i = Σ_t δ_{t,i},

a 1 × (1 [+ 1]) outer product per channel. The rule reads every channel as one group: a has shape
(B, T, D, 1 [+ 1]) with a_{t,i} = [x̂_{t,i} (, 1)], δ has shape (B, T, D, 1), and G_b[i] is
(1, 1 [+ 1]) = [∂ℓ/∂γ_i (, ∂ℓ/∂β_i)]. Everything downstream (LoGra, K-FAC, storage) sees an ordinary
grouped layer; LoGra leaves both sides uncompressed (their dimensions are 1 and 2).

x̂ is recomputed from the layer's input in float32:

* LayerNorm: x̂ = (x − mean(x)) / sqrt(var(x) + ε) over the normalised (trailing) dimensions, var biased;
* RMSNorm: x̂ = x / sqrt(mean(x²) + ε) (torch's ``nn.RMSNorm``; the Hugging Face classes listed in
  ``HF_RMS_NORMS`` — Llama, Qwen2, Mistral, T5, … — share this rule: weight only, ε in ``variance_epsilon``);
* BatchNorm (eval): x̂ = (x − running_mean) / sqrt(running_var + ε) per channel (dimension 1). In
  training mode (or without running statistics) BatchNorm normalises with the batch's statistics, so
  one example's output depends on the others and no per-example gradient exists: a clear error.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from analog.capture.rules import RECOGNISERS, LayerRule, append_ones, has_bias, probe_like


def _weight(module):
    return getattr(module, "weight", None)


class _AffineRule(LayerRule):
    """Shared maths: subclasses give ``normalised(module, x) -> (B, T, D)`` and the channel shape."""

    channels_last = True

    def channel_shape(self, module) -> tuple:
        return tuple(_weight(module).shape)

    def normalised(self, module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def groups(self, module) -> int:
        return math.prod(self.channel_shape(module))

    def in_dim(self, module) -> int:
        return 1 + int(has_bias(module))

    def out_dim(self, module) -> int:
        return 1

    def probe_input(self, module, generator):
        if _weight(module) is None:
            return None
        return probe_like(module, torch.randn(2, 3, *self.channel_shape(module), generator=generator))

    def unsupported(self, module):
        if _weight(module) is None:
            return "no elementwise affine weight"
        return None

    def activations(self, module, x):
        a = self.normalised(module, x).unsqueeze(-1)  # (B, T, D, 1)
        return append_ones(a) if has_bias(module) else a

    def output_grads(self, module, grad_out):
        return self.to_positions(module, grad_out).unsqueeze(-1)

    def to_positions(self, module, t: torch.Tensor) -> torch.Tensor:
        """(B, *, *channel_shape) -> (B, T, D): the normalised dimensions are trailing."""
        return t.reshape(t.shape[0], -1, self.groups(module))

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        b = grad.shape[0]
        out = {"weight": grad[:, :, 0, 0].reshape(b, *self.channel_shape(module))}
        if has_bias(module):
            out["bias"] = grad[:, :, 0, 1].reshape(b, *self.channel_shape(module))
        return out


class LayerNormRule(_AffineRule, module_type=nn.LayerNorm):
    def normalised(self, module, x):
        x = self.to_positions(module, x)
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + module.eps)


class RMSNormRule(_AffineRule, module_type=nn.RMSNorm):
    def eps(self, module, x) -> float:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        return torch.finfo(x.dtype).eps if eps is None else eps

    def normalised(self, module, x):
        x = self.to_positions(module, x)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps(module, x))


#: Hugging Face RMSNorm classes computing weight * x / sqrt(mean(x²) + ε) (no bias; ε in ``variance_epsilon`` or
#: ``eps``), or (1 + weight) * x / sqrt(mean(x²) + ε) (Gemma)
HF_RMS_NORMS = (
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.mixtral.modeling_mixtral.MixtralRMSNorm",
    "transformers.models.phi3.modeling_phi3.Phi3RMSNorm",
    "transformers.models.t5.modeling_t5.T5LayerNorm",
    "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm",
    # Gemma's RMSNorms compute (1 + weight) * x̂: the same gradient Σ_t δ_t x̂_t with respect to the weight
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm",
    "transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm",
    "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm",
)
for _path in HF_RMS_NORMS:
    type(_path.rsplit(".", 1)[1] + "Rule", (RMSNormRule,), {}, module_type=_path)


def recognise_rms_norm(module: nn.Module) -> Optional[LayerRule]:
    """``RMSNormRule`` for an unregistered layer that computes an RMSNorm, else None.

    Transformers has one RMSNorm class per model (Granite, SmolLM3, DeepSeek, …), most of them copies of
    Llama's. A module is accepted when its class name ends in ``RMSNorm``, it has no submodules, its only
    parameter is a 1-D ``weight`` (d), ε is in ``variance_epsilon`` or ``eps``, and on a probe input x (2 × 3 × d,
    private generator) its forward returns x̂ ⊙ (w + c) with x̂ = x / sqrt(mean(x²) + ε), for its own weight
    and for a random weight, with the same c ∈ {0, 1} (c = 1: Gemma-style (1 + w)). Either way the weight
    gradient is Σ_t δ_t ⊙ x̂_t, the rule's. The weight is swapped in place for the second probe and put back.
    """
    return _recognise(module, "RMSNorm", _RMS_RULE)


def recognise_weight_only_layer_norm(module: nn.Module) -> Optional[LayerRule]:
    """A LayerNorm without bias written out by hand (Cohere's ``CohereLayerNorm``: ε in ``variance_epsilon``):
    as ``recognise_rms_norm`` with a class name ending in ``LayerNorm`` and x̂ = (x − mean) / sqrt(var + ε)."""
    if isinstance(module, nn.LayerNorm):
        return None  # subclasses of nn.LayerNorm are LayerNormRule's (analog.capture.rules.forward_matches_base)
    return _recognise(module, "LayerNorm", _WEIGHT_ONLY_LN_RULE)


def _recognise(module: nn.Module, suffix: str, rule: "_AffineRule") -> Optional[LayerRule]:
    if not type(module).__name__.endswith(suffix) or any(True for _ in module.children()):
        return None
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) != {"weight"} or weight.dim() != 1 or weight.is_meta:
        return None
    if getattr(module, "variance_epsilon", getattr(module, "eps", None)) is None:
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, weight.shape[0], generator=gen).to(device=weight.device, dtype=weight.dtype)
    x_hat = rule.normalised(module, x.float()).reshape(x.shape)
    other = torch.empty_like(weight).copy_(torch.rand(weight.shape, generator=gen) + 0.5)
    offsets = None
    with torch.no_grad():
        for w in (weight, other):
            if w is other:
                module._parameters["weight"] = nn.Parameter(other, requires_grad=weight.requires_grad)
            try:
                y = type(module).forward(module, x)
            finally:
                module._parameters["weight"] = weight
            fits = {c for c in (0.0, 1.0) if _close_to(y, x_hat * (w.float() + c))}
            offsets = fits if offsets is None else offsets & fits
    return rule if offsets else None


def _close_to(got, want) -> bool:
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    tol = max(64 * torch.finfo(torch.float32).eps, 4 * torch.finfo(got.dtype).eps)
    return bool(torch.allclose(got.float(), want, rtol=tol, atol=tol * max(float(want.abs().max()), 1e-30)))


class _WeightOnlyLayerNormRule(RMSNormRule):
    """LayerNorm maths with ε read as ``RMSNormRule`` reads it (unregistered: used by the recogniser)."""

    def normalised(self, module, x):
        x = self.to_positions(module, x)
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps(module, x))


_RMS_RULE = RMSNormRule()
_WEIGHT_ONLY_LN_RULE = _WeightOnlyLayerNormRule()
RECOGNISERS.extend([recognise_rms_norm, recognise_weight_only_layer_norm])


class BatchNormRule(_AffineRule, module_type=nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d in eval mode: channels on dimension 1, positions the remaining dimensions."""

    channels_last = False

    def channel_shape(self, module) -> tuple:
        return (module.num_features,)

    def probe_input(self, module, generator):
        return None  # a forward in training mode would update the running statistics

    def unsupported(self, module):
        if not module.track_running_stats:
            return "BatchNorm without running statistics normalises with the batch's statistics (mixes examples)"
        return super().unsupported(module)

    def check_call(self, module, name):
        if module.training or module.running_mean is None:
            raise RuntimeError(
                f"module {name!r} ({type(module).__name__}) is in training mode: it normalises with the statistics "
                "of the whole batch, so one example's output depends on the others and it has no per-example "
                "gradient. Call model.eval() for logging (running statistics), or leave it out with "
                f"watch(..., exclude=[{name!r}])")

    def to_positions(self, module, t):
        c = module.num_features
        return t.reshape(t.shape[0], c, -1).transpose(1, 2)  # (B, C, *S) -> (B, S, C)

    def normalised(self, module, x):
        x = self.to_positions(module, x)
        return (x - module.running_mean.float()) * torch.rsqrt(module.running_var.float() + module.eps)
