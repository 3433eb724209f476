"""Precondition, then project: K-FAC whitening folded into LoGra's projection matrices.

Influence needs g_qᵀ (F + λI)⁻¹ g_t; a random projection preserves plain inner products gᵀg′,
which the inverse curvature reweights by orders of magnitude. With the Kronecker factors of a
first statistics pass (per module and group, A = E[a aᵀ] of shape (d_in, d_in) and S = E[δ δᵀ]
of shape (d_out, d_out), as ``analog.hessian.kfac`` collects them) and damping split between the
two sides,

    A_λ = A + λ_A I,   S_λ = S + λ_S I,   λ_A = π √λ,  λ_S = √λ / π,  π = sqrt(mean eig A / mean eig S)

(Martens & Grosse's π-split, so that λ_A λ_S = λ), the whitened per-sample gradient is
G̃ = S_λ^{-1/2} G A_λ^{-1/2} and

    ⟨G̃, G̃′⟩ = vec(G)ᵀ (S_λ ⊗ A_λ)⁻¹ vec(G′)  ≈  gᵀ (F̂_KFAC + λI)⁻¹ g′.

LoGra then projects G̃ instead of G: with Gaussian R_in (d_in × r_in), R_out (d_out × r_out),
entries N(0, 1/r), the stored gradient is

    R_outᵀ G̃ R_in = (S_λ^{-1/2} R_out)ᵀ G (A_λ^{-1/2} R_in) = P_outᵀ G P_in,

i.e. the whitening folds into P_in = A_λ^{-1/2} R_in and P_out = S_λ^{-1/2} R_out, so logging costs
exactly what random LoGra costs. E over the R's of ⟨stored, stored′⟩ = ⟨G̃, G̃′⟩, and (Gaussian R)

    Var ≤ 2 ‖G̃‖²‖G̃′‖² (1/r_out + (1 + 2/r_out)/r_in)

(a side kept whole, r ≥ d, contributes 0 for its 1/r: it is whitened by the d × d root itself).
λ: an explicit float, or ``None`` for the heuristic 0.1 × mean eigenvalue of S ⊗ A — the same
default as the curvature's damping.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from analog.hessian.base import HEURISTIC_DAMPING, CurvatureError


def split_damping(name: str, eig_a: torch.Tensor, eig_s: torch.Tensor,
                  damping: Optional[float]) -> Tuple[float, float]:
    """(λ_A, λ_S) with λ_A λ_S = λ, balanced by the factors' mean eigenvalues (π-split).

    Raises a CurvatureError naming the module when a factor is zero: the statistics pass saw no
    activation or no output gradient for it, and no whitening can be derived.
    """
    mean_a, mean_s = float(eig_a.clamp_min(0).mean()), float(eig_s.clamp_min(0).mean())
    for side, mean in (("activation", mean_a), ("output-gradient", mean_s)):
        if not mean > 0 or not math.isfinite(mean):
            raise CurvatureError(
                f"module {name!r}: the statistics pass gave a zero or non-finite {side} covariance "
                f"(mean eigenvalue {mean}); no gradient reached it or it saw no data. Leave it out with "
                "watch(name_filter=...), or use compression init 'random'")
    lam = HEURISTIC_DAMPING * mean_a * mean_s if damping is None else float(damping)
    if not lam > 0:
        raise CurvatureError(
            f"module {name!r}: whitening needs a damping λ > 0 (got {lam}); the factors are "
            "singular whenever a module sees fewer distinct inputs than its width. Set "
            "compression.damping to a positive value or None (0.1 × mean eigenvalue)")
    pi = math.sqrt(mean_a / mean_s)
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


def inverse_root(factor: torch.Tensor, lam: float) -> torch.Tensor:
    """(M + λI)^{-1/2} of symmetric PSD (G, d, d) factors, in float64 (negative rounding clamped)."""
    return _root(torch.linalg.eigh(factor.double()), lam)


def _root(eig, lam: float) -> torch.Tensor:
    """(M + λI)^{-1/2} = Q diag((e + λ)^{-1/2}) Qᵀ from M's eigendecomposition ``eig`` = (e, Q)."""
    evals, evecs = eig
    scale = (evals.clamp_min(0) + lam).rsqrt()
    return (evecs * scale[..., None, :]) @ evecs.transpose(-1, -2)


def whitening(name: str, a: torch.Tensor, s: torch.Tensor, damping: Optional[float]):
    """(A_λ^{-1/2}, S_λ^{-1/2}, λ_A, λ_S) for one module's factors A (G, d_in, d_in), S (G, d_out, d_out);
    one eigendecomposition per factor serves both the damping split and the root."""
    eig_a, eig_s = torch.linalg.eigh(a.double()), torch.linalg.eigh(s.double())
    lam_a, lam_s = split_damping(name, eig_a.eigenvalues, eig_s.eigenvalues, damping)
    return _root(eig_a, lam_a), _root(eig_s, lam_s), lam_a, lam_s


def spread_bound(norm_q: torch.Tensor, norm_t: torch.Tensor, r_out: Optional[int], r_in: Optional[int]):
    """The standard-deviation bound over projection seeds of a whitened LoGra score (see the module
    docstring); ``None`` for a side kept whole."""
    inv_out = 0.0 if r_out is None else 1.0 / r_out
    inv_in = 0.0 if r_in is None else 1.0 / r_in
    return norm_q * norm_t * math.sqrt(2 * (inv_out + (1 + 2 * inv_out) * inv_in))
