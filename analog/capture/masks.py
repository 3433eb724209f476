"""What ``with analog(mask=...)`` means, and which mask each watched module gets.

A mask never changes a logged gradient: the ``grad`` (and ``token_grad``) logs are always the
per-sample gradients of the loss the user backpropagates, whatever the mask says. With Hugging Face
labels (−100 on padding) that loss already leaves out what padding must not contribute, and with left
padding the last pad position *does* contribute (its logits predict the first real token), so masking
gradients would make them differ from the loss.

The mask (1 = a real position, 0 = padding) is used for what is *about positions*:

* statistics — the K-FAC/EK-FAC factors A = E[a aᵀ] and S, and LoGra's PCA covariances, are taken over
  real positions only (the token count T_total = Σ mask); so are the query pass's Gram matrices
  (LoGra ``init: query``, analog.compression.query): a query gradient's directions are those of
  Σ_t m_t δ_t a_tᵀ over its real positions;
* per-token positions — ``analog(per_token=True)`` keeps every position's share δ̃_t ã_tᵀ (they sum to
  the logged gradient); the mask tells the caller which positions are real, and its T which axis of a
  per-head norm's (tokens × heads) positions holds the tokens (analog.capture.tokens).

A module gets the mask only when its input has positions: one with a single position per example (a
classifier head on pooled features) has nothing to mask. A module with T > 1 positions must match the
mask's (B, T) exactly, otherwise it is an error naming the module. A mask that fits no watched module
at all is an error too (nothing silent).

Encoder-decoder models have two position axes, so one mask cannot describe both: pass a dict of
name patterns to masks, e.g. ``mask={"encoder": attention_mask, "decoder": decoder_attention_mask}``;
a module takes the first pattern that is a substring of its name or glob-matches it. Modules that match
no pattern get no mask. For a model whose config says ``is_encoder_decoder``, a single tensor is refused.
A decoder's cross-attention keys and values read the *encoder's* positions: ``seq2seq_masks(enc, dec)``
builds the dict for Hugging Face encoder-decoders (T5, BART-style names) with those listed first.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, Mapping, Optional, Union

import torch

from analog.capture.tokens import axes_of_length, position_grid

MaskArg = Union[None, torch.Tensor, Mapping[str, torch.Tensor]]


def _matches(name: str, pattern: str) -> bool:
    return pattern in name or fnmatch.fnmatchcase(name, pattern)


def resolve_masks(mask: MaskArg, names: Iterable[str], encoder_decoder: bool = False) -> Dict[str, torch.Tensor]:
    """{module name: (B, T) mask} for the watched modules ``names``; modules without a mask are absent."""
    names = list(names)
    if mask is None:
        return {}
    if isinstance(mask, torch.Tensor):
        if encoder_decoder:
            raise ValueError(
                "the watched model is an encoder-decoder: one mask cannot describe both the encoder's and the "
                "decoder's positions; pass mask={'encoder': attention_mask, 'decoder': decoder_attention_mask} "
                "(keys are substrings or glob patterns of module names)")
        if mask.dim() != 2:
            raise ValueError(f"mask must have shape (batch, positions); got {tuple(mask.shape)}")
        return dict.fromkeys(names, mask)
    if not isinstance(mask, Mapping):
        raise TypeError(f"mask must be a tensor or a dict of name pattern -> tensor; got {type(mask).__name__}")
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for name in names:
        for pattern, value in mask.items():
            if _matches(name, pattern):
                out[name] = value
                used.add(pattern)
                break
    unused = [p for p in mask if p not in used]
    if unused and not isinstance(mask, SideMasks):
        raise ValueError(f"mask patterns {unused} match no watched module; watched: {names[:8]}"
                         f"{' …' if len(names) > 8 else ''}")
    return out


class SideMasks(dict):
    """A dict of name pattern -> mask whose patterns may match no module (built by ``seq2seq_masks``)."""


#: cross-attention projections that read encoder positions (T5, BART/Whisper/Marian/Pegasus-style names)
CROSS_ATTENTION_KV = ("*EncDecAttention.k", "*EncDecAttention.v", "*encoder_attn.k_proj", "*encoder_attn.v_proj")


def seq2seq_masks(attention_mask: torch.Tensor, decoder_attention_mask: torch.Tensor) -> SideMasks:
    """Masks for a Hugging Face encoder-decoder: encoder positions for the encoder and for the decoder's
    cross-attention keys/values, decoder positions for the rest of the decoder (names containing "decoder",
    among them BART's ``decoder.layers.*.encoder_attn.q_proj``) and the LM head."""
    out = SideMasks({p: attention_mask for p in CROSS_ATTENTION_KV})
    # "decoder" before "encoder": BART-style decoders name their cross-attention "encoder_attn" (its queries,
    # output projection and norm are at decoder positions)
    out.update({"decoder": decoder_attention_mask, "encoder": attention_mask, "lm_head": decoder_attention_mask})
    return out


def is_encoder_decoder(model) -> bool:
    """True for a Hugging Face model (or a wrapper holding one) whose config says ``is_encoder_decoder``."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "is_encoder_decoder", False):
            return True
    return False


def mask_for_factors(mask: Optional[torch.Tensor], name: str, x: torch.Tensor,
                     input_shape: Optional[torch.Size] = None) -> Optional[torch.Tensor]:
    """The (B, T) mask that applies to factors ``x`` (B, P, ...) of module ``name``; None when it has no positions.

    ``input_shape``: the module input's shape when its rule flattens the input's middle dimensions in order
    into positions (``LayerRule.channels_last``): an input (B, *G, D) has P = ΠG positions on the grid G.
    A per-head norm reads (B, T, heads, head_dim) (Qwen3's q_norm/k_norm) or (B, heads, T, head_dim)
    (Gemma3's): when exactly one axis of G has the mask's T positions, the mask is broadcast along the
    other axes of G, so every head of a padded token counts as padding. When several axes have T
    positions (heads == T) and the mask holds padding, which one is the token axis cannot be told: an
    error naming the module (a mask without padding is the same either way).
    """
    if mask is None or x.shape[1] == 1:
        return None
    grid = () if input_shape is None else position_grid(input_shape, x.shape[1])
    if len(grid) >= 2 and x.shape[1] != mask.shape[1] and x.shape[0] == mask.shape[0]:
        mask = _over_grid(mask, name, grid)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit module {name!r}, whose inputs have "
            f"{x.shape[1]} positions for {x.shape[0]} examples")
    return mask.to(device=x.device, dtype=x.dtype)


def _over_grid(mask: torch.Tensor, name: str, grid: tuple) -> torch.Tensor:
    """(B, T) -> (B, ΠG): the mask broadcast along the axes of ``grid`` other than the one of length T."""
    b, t = mask.shape
    axes = axes_of_length(grid, t)
    if not axes:
        return mask  # fits no axis: the caller's shape check names the module
    if len(axes) > 1 and not bool((mask != 0).all()):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} is ambiguous for module {name!r}: its input has positions "
            f"{grid} per example, with {t} on {len(axes)} axes, so the token axis cannot be told apart (e.g. as "
            f"many heads as tokens); pad to another length, or leave the module out of the mask with a dict "
            f"mask or watch(..., exclude=[{name!r}])")
    view = [1] * len(grid)
    view[axes[0]] = t
    return mask.reshape(b, *view).expand(b, *grid).reshape(b, -1)
