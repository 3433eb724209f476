"""K-FAC and EK-FAC in the (possibly LoGra-projected) space of the logged gradients.

Factors collected by the hooks over every position t of every example (masked positions zeroed):

    A = (1/T_total) Σ a_t a_tᵀ     (G, r_in, r_in),   T_total = number of unmasked positions
    S = (1/N)       Σ δ_t δ_tᵀ     (G, r_out, r_out), N = number of examples

so that, for row-major vec(G), F ≈ S ⊗ A (for sequences this scales as T·E[δδᵀ]⊗E[aaᵀ], matching
F's per-example sum over positions). With S = Q_S diag(s) Q_Sᵀ and A = Q_A diag(α) Q_Aᵀ (float64):

    K-FAC:   (F̂ + λI)⁻¹ G = Q_S [(Q_Sᵀ G Q_A) ⊘ (s αᵀ + λ)] Q_Aᵀ
    EK-FAC:  the same with s αᵀ replaced by the corrected eigenvalues
             Λ = (1/N) Σ_n (Q_Sᵀ G_n Q_A)⊙²,
             computed by one streaming read of the stored per-sample gradients (no second model
             pass), i.e. the diagonal of the Fisher in the Kronecker eigenbasis.
"""

from __future__ import annotations

import torch

from analog.distributed import all_gather_object, all_reduce_sum
from analog.hessian.base import (
    DEFAULT_FIT_BYTES,
    Curvature,
    CurvatureError,
    add_sums,
    damping_value,
    reduce_sums,
    share_sums,
)


class KFAC(Curvature, kind="kfac"):
    needs_factors = True

    def batch_stats(self, observed):
        """Σ over one batch's calls of their factor sums: what the store commits with the batch's rows."""
        stats = {}
        for name, a, d, mask in observed:
            add_sums(stats, factor_sums(name, a, d, mask))
        return stats

    def _finalize(self, store, progress, fit_bytes=DEFAULT_FIT_BYTES):
        """Factors from the sums: from the store's chunks (already over every rank) when there is a
        store, else this process's running sums, reduced over ranks."""
        n = self.meta["n_samples"]
        if n == 0:
            raise CurvatureError(f"{self.kind}: no examples were logged; nothing to fit")
        reduce = all_reduce_sum if store is None else (lambda t: t)
        for name, (a_shape, s_shape) in self._factor_shapes().items():
            zeros = lambda shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731  (a rank that saw none)
            tokens = reduce(self.state.pop(f"{name}/tokens", zeros(()))).cpu()
            a = reduce(self.state.pop(f"{name}/A_sum", zeros(a_shape))).cpu() / tokens.clamp_min(1)
            s = reduce(self.state.pop(f"{name}/S_sum", zeros(s_shape))).cpu() / n
            alpha, q_a = torch.linalg.eigh(a)
            sigma, q_s = torch.linalg.eigh(s)
            self.state.update({f"{name}/A": a, f"{name}/S": s, f"{name}/QA": q_a, f"{name}/QS": q_s,
                               f"{name}/eA": alpha.clamp_min(0), f"{name}/eS": sigma.clamp_min(0)})

    def _factor_shapes(self):
        """{module: (A shape, S shape)} over every rank, so each rank makes the same reductions."""
        local = {m: (tuple(self.state[f"{m}/A_sum"].shape), tuple(self.state[f"{m}/S_sum"].shape))
                 for m in self.modules()}
        shapes = {}
        for part in all_gather_object(local):
            shapes.update(part)
        return dict(sorted(shapes.items()))

    def eigenvalues(self, name: str) -> torch.Tensor:
        """(G, r_out, r_in) eigenvalues of F̂ in the Kronecker eigenbasis: s αᵀ."""
        return self.require(name, "eS")[:, :, None] * self.require(name, "eA")[:, None, :]

    def precondition(self, name, g, damping=None):
        q_s, q_a = self.require(name, "QS"), self.require(name, "QA")
        evals = self.eigenvalues(name)
        lam = damping_value(evals, damping)
        g64 = g.double().reshape(g.shape[0], *evals.shape)
        q_s, q_a, evals = q_s.to(g.device), q_a.to(g.device), evals.to(g.device)
        rotated = q_s.transpose(-1, -2) @ g64 @ q_a
        return (q_s @ (rotated / (evals + lam)) @ q_a.transpose(-1, -2)).reshape(g.shape)


def factor_sums(name, a, d, mask):
    """One call's Σ a aᵀ, Σ δ δᵀ and number of positions: float32 products, float64 sums, on the
    logging device. a (B, T, G, r_in), d (B, T, G, r_out); masked positions are zero in both."""
    a_sum = torch.einsum("btgi,btgj->gij", a, a).double()
    s_sum = torch.einsum("btgo,btgp->gop", d, d).double()
    if mask is not None and a.shape[1] > 1:
        tokens = mask.to(a.device).sum().double()
    else:
        tokens = torch.tensor(float(a.shape[0] * a.shape[1]), dtype=torch.float64, device=a.device)
    return {f"{name}/A_sum": a_sum, f"{name}/S_sum": s_sum, f"{name}/tokens": tokens}


class EKFAC(KFAC, kind="ekfac"):
    needs_store = True

    def _finalize(self, store, progress, fit_bytes=DEFAULT_FIT_BYTES):
        if store is None:
            raise CurvatureError("EK-FAC corrects eigenvalues from the logged gradients: set save=True")
        super()._finalize(store, progress, fit_bytes)

        def add(name, total, g):
            q_s, q_a = self.state[f"{name}/QS"], self.state[f"{name}/QA"]
            rotated = q_s.transpose(-1, -2) @ g.reshape(g.shape[0], *self._shape(name)) @ q_a
            term = (rotated**2).sum(0)
            return term if total is None else total.add_(term)

        sums = share_sums(store, add, progress, "EK-FAC eigenvalue correction")
        sums = reduce_sums(sums, store, lambda name, shape: self._shape(name))
        for name in self.modules():
            if name not in sums:
                raise CurvatureError(f"EK-FAC: the store has no gradients for module {name!r}")
            self.state[f"{name}/corrected"] = sums[name] / len(store)

    def _shape(self, name):
        return (self.state[f"{name}/QS"].shape[0], self.state[f"{name}/QS"].shape[-1],
                self.state[f"{name}/QA"].shape[-1])

    def eigenvalues(self, name):
        return self.require(name, "corrected")
