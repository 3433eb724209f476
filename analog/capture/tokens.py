"""Per-token gradients of layers whose positions are a grid of tokens and heads.

``analog(per_token=True)`` logs, for every watched module, each token's share of the per-sample gradient,

    G_{b,t} = Σ_{p ∈ token t} δ̃_{b,p} ã_{b,p}ᵀ        shape (B, T, groups, r_out, r_in),  Σ_t G_{b,t} = G_b,

which is the gradient of the loss with respect to a copy of the weight used at token t alone (the layer's
output at every other token held fixed). For most layers a position p is a token. A channels-last layer
(``LayerRule.channels_last``) whose input is (B, *grid, D) with two or more grid axes has Π grid positions
per example, of which one axis holds the tokens: a per-head norm reads (B, T, heads, head_dim) (Qwen3's
q_norm/k_norm) or (B, heads, T, head_dim) (Gemma3's). Its token shares sum the positions of the other axes:

    G_{b,t} = Σ_h δ̃_{b,t,h} ã_{b,t,h}ᵀ       (Qwen3; Gemma3 the same with the axes swapped).

The token axis is the one grid axis of length T, the token count of the block: the positions of the module's
mask when one was given (analog.capture.masks), otherwise the sequence length of the watched model's first
input (``input_ids`` (B, T) or ``inputs_embeds`` (B, T, D): its dimension 1). When no axis, or more than one
(as many heads as tokens), has length T, or T is not known, the module's token shares cannot be told apart:
an error naming the module, never a gradient per head-and-token position read as one per token.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def position_grid(shape: Tuple[int, ...], positions: int) -> Tuple[int, ...]:
    """The axes of a channels-last input of ``shape`` (B, *grid, *channels) that make up its ``positions`` per
    example: the shortest run of dimensions after the batch whose product is ``positions`` ((positions,) if none)."""
    size = 1
    for end in range(1, len(shape)):
        size *= shape[end]
        if size == positions:
            return tuple(shape[1 : end + 1])
    return (positions,)


def axes_of_length(grid: Tuple[int, ...], t: int) -> List[int]:
    """The axes of ``grid`` (a module's positions per example) that have ``t`` entries."""
    return [i for i, n in enumerate(grid) if n == t]


def token_axis(name: str, grid: Tuple[int, ...], t: Optional[int], source: str) -> Optional[int]:
    """The axis of ``grid`` holding the tokens, or None when the positions are the tokens (fewer than two axes).

    ``t``: the block's token count (None: unknown), read from ``source`` (named in errors)."""
    if len(grid) < 2:
        return None
    exclude = f"or leave the module out with watch(..., exclude=[{name!r}])"
    state = "pass mask=attention_mask (B, T) to `with analog(..., per_token=True)` to state the tokens"
    head = f"per-token gradients of module {name!r}: its input has positions {grid} per example (tokens × heads)"
    if t is None:
        raise ValueError(f"{head} and the token count is not known ({source} has no second dimension) to tell which "
                         f"axis holds the tokens: {state}, {exclude}")
    axes = axes_of_length(grid, t)
    if not axes:
        raise ValueError(f"{head} and none of its axes has the {t} tokens that {source} gives: if that is not the "
                         f"token count, {state}; {exclude}")
    if len(axes) > 1:
        raise ValueError(f"{head} and {len(axes)} of its axes have the {t} tokens that {source} gives (as many "
                         "heads as tokens), so the token axis cannot be told apart: use a sequence length other "
                         f"than the number of heads, {exclude}")
    return axes[0]


def token_products(d: torch.Tensor, a: torch.Tensor, grid: Tuple[int, ...], axis: Optional[int]) -> torch.Tensor:
    """Σ over each token's positions of δ̃_p ã_pᵀ: (B, P, G, o), (B, P, G, i) -> (B, T, G, o, i).

    ``grid`` and ``axis`` as ``token_axis`` gives them (axis None: P = T, one position per token); the positions
    p = 0 … P−1 enumerate ``grid`` in row-major order."""
    if axis is None:
        return torch.einsum("btgo,btgi->btgoi", d, a)
    b, _, g = d.shape[:3]
    t = grid[axis]

    def tokens_first(f: torch.Tensor) -> torch.Tensor:  # (B, P, G, r) -> (B, T, P / T, G, r)
        return f.reshape(b, *grid, g, f.shape[-1]).movedim(1 + axis, 1).reshape(b, t, -1, g, f.shape[-1])

    return torch.einsum("btkgo,btkgi->btgoi", tokens_first(d), tokens_first(a))
