"""Modules whose input has no batch dimension of its own.

**Recoverable: a batch-1 input broadcast after the module.** A position embedding is called with
position ids of shape (1, T) and its output (1, T, D) is added to the (B, T, D) token embeddings. The
gradient that reaches its output is already summed over the batch, so analog does not hook that
tensor: the forward hook hands the model ``output.expand(B, …)`` instead (the same values, so the
model computes exactly what it computed before) and hooks the expanded tensor, whose gradient is the
per-example output gradient δ_b. The activations are shared: a_b = a for every example, and the
per-sample gradient is Σ_t δ_{b,t} a_tᵀ — exact.

The batch size B comes from ``data_id`` (one id per example). Without ids it is read from the first
tensor argument of the watched model's own call (``input_ids``, ``pixel_values``, …) and checked at
the end of the block against the batch the other modules saw: a mismatch is an error, never a guess.
Whether a module's input is broadcast is decided by its leading dimension being 1 while B > 1; a
leading dimension that is neither 1 nor B is an error naming the module.

**Not recoverable: broadcast inside the consumer, along another axis.** T5's
``relative_attention_bias`` is an embedding called with a (q_len, k_len) matrix of buckets, no batch
dimension at all; its output is permuted to (1, H, q, k) and added to every example's scores. The
gradient at its boundary is the batch sum and its leading dimension is q_len, which may even equal
B — no check on shapes could tell. Such modules are listed here by name, left out of the default
``watch`` with a warning (and reported in the coverage), and refused with a clear error when named.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

#: last name component -> why its per-sample gradients cannot be recovered at the module's boundary
SHARED_ACROSS_BATCH = {
    "relative_attention_bias": (
        "called without a batch dimension (a (q_len, k_len) bucket matrix) and broadcast over the batch inside "
        "the attention: its per-sample gradients are not recoverable at its boundary"
    ),
}


def unrecoverable_reason(name: str, module: nn.Module) -> Optional[str]:
    """Why ``module`` (watched as ``name``) cannot get per-sample gradients at its boundary, or None."""
    return SHARED_ACROSS_BATCH.get(name.rsplit(".", 1)[-1])
