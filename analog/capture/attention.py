"""``nn.MultiheadAttention``: its input projection and its output projection as one grouped layer.

The layer never calls ``out_proj`` as a module: ``F.multi_head_attention_forward`` uses
``in_proj_weight`` (3D × D) and ``out_proj.weight`` (D × D) directly. Both are Linears inside the call:

    q' = q W_qᵀ + b_q,  k' = k W_kᵀ + b_k,  v' = v W_vᵀ + b_v,   (W_q; W_k; W_v) = in_proj_weight
    c  = attention(q', k', v')  (per head, masks applied),      o = c W_oᵀ + b_o

so the per-sample gradient of each is Σ_t δ_t a_tᵀ with (a, δ) = (q, ∂ℓ/∂q'), (k, ∂ℓ/∂k'), (v, ∂ℓ/∂v'),
(c, ∂ℓ/∂o). All four are D × (D [+ 1]), so the rule logs them as four groups of one layer:
a (B, T, 4, D [+ 1]) and δ (B, T, 4, D), G_b of shape (4, D, D [+ 1]). For cross-attention the key/value
length S may differ from the query length T: the shorter side is padded with zero positions (which add
nothing to Σ_t).

To see q', k', v' and c, the forward hook recomputes the call from the same inputs and the same
weights (the projections, scaled dot-product scores, masks, softmax, the head merge and the output
projection) and hands the model that output; it equals the layer's own up to float rounding, and
gradients flow to the weights and inputs exactly as before. Supported: ``batch_first`` either way,
``key_padding_mask`` and ``attn_mask`` (bool or float, 2-D or 3-D), ``need_weights``. Not supported
(reported at ``watch``): separate key/value dimensions, ``add_bias_kv``, ``add_zero_attn``; dropout in
training mode is an error at the call (random masks differ between examples and the reference).
"""

from __future__ import annotations

import inspect
import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from analog.capture.rules import Call, LayerRule, append_ones

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _bias(module):
    return module.in_proj_bias is not None


class MultiheadAttentionRule(LayerRule, module_type=nn.MultiheadAttention):
    def covered_params(self, module):
        return dict(module.named_parameters())  # in_proj_* and out_proj.* (out_proj is claimed)

    def unsupported(self, module):
        if not module._qkv_same_embed_dim:
            return "separate key/value dimensions (kdim/vdim) are not supported"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        if (module.out_proj.bias is None) != (module.in_proj_bias is None):
            return "in_proj and out_proj must both have a bias or both not"
        return None

    def check_call(self, module, name):
        if module.training and module.dropout > 0:
            raise RuntimeError(f"module {name!r} (MultiheadAttention) applies dropout in training mode: per-sample "
                               "gradients would depend on random masks; call model.eval() for logging")

    def groups(self, module) -> int:
        return 4

    def in_dim(self, module) -> int:
        return module.embed_dim + int(_bias(module))

    def out_dim(self, module) -> int:
        return module.embed_dim

    def intercept(self, module, args, kwargs, output, name) -> Call:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments
        q, k, v = p["query"], p["key"], p["value"]
        if q.dim() != 3:
            raise ValueError(f"module {name!r} (MultiheadAttention) got an unbatched input; analog needs a batch")
        if not module.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        d = module.embed_dim
        w, b = module.in_proj_weight, module.in_proj_bias
        proj = [F.linear(t, w[i * d:(i + 1) * d], None if b is None else b[i * d:(i + 1) * d])
                for i, t in enumerate((q, k, v))]
        length = max(q.shape[1], k.shape[1])
        site = torch.stack([_pad(t, length) for t in proj], 2)  # (B, L, 3, D): gradients of q', k', v'
        qp, kp, vp = (site[:, : t.shape[1], i] for i, t in enumerate((q, k, v)))
        context, weights = _attend(module, qp, kp, vp, p["key_padding_mask"], p["attn_mask"])
        out = F.linear(context, module.out_proj.weight, module.out_proj.bias)
        x = torch.stack([_pad(t, length) for t in (q, k, v, context)], 2)  # (B, L, 4, D)
        returned = out if module.batch_first else out.transpose(0, 1)
        if p["need_weights"]:
            weights = weights.mean(1) if p["average_attn_weights"] else weights
        else:
            weights = None
        return Call((returned, weights), x, (site, out), replaced=True)

    def activations(self, module, x):
        return append_ones(x) if _bias(module) else x

    def output_grads(self, module, grads):
        g_qkv, g_out = grads
        return torch.cat([g_qkv, _pad(g_out, g_qkv.shape[1]).unsqueeze(2)], 2)

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        b, _, d, _ = grad.shape
        out = {"in_proj_weight": grad[:, :3, :, :d].reshape(b, 3 * d, d), "out_proj.weight": grad[:, 3, :, :d]}
        if _bias(module):
            out["in_proj_bias"] = grad[:, :3, :, d].reshape(b, 3 * d)
            out["out_proj.bias"] = grad[:, 3, :, d]
        return out


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero positions appended on dimension 1 up to ``length``."""
    return t if t.shape[1] == length else F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]))


def _attend(module, qp, kp, vp, key_padding_mask, attn_mask):
    """Multi-head scaled dot-product attention: (B, T, D) each -> context (B, T, D), weights (B, H, T, S)."""
    bsz, t, d = qp.shape
    s, h = kp.shape[1], module.num_heads
    heads = [x.reshape(bsz, -1, h, d // h).transpose(1, 2) for x in (qp, kp, vp)]
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(d // h)  # (B, H, T, S)
    if attn_mask is not None:  # (T, S) for every example and head, or (B·H, T, S)
        extra = _additive(attn_mask, scores)
        scores = scores + (extra.reshape(bsz, h, t, s) if attn_mask.dim() == 3 else extra)
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores)[:, None, None, :]
    weights = torch.softmax(scores, -1)
    context = (weights @ heads[2]).transpose(1, 2).reshape(bsz, t, d)
    return context, weights


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = not allowed) as −inf, a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)
