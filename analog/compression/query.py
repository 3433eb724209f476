"""Query-aware projections: keep the directions that the queries' whitened gradients occupy.

A random sketch of k numbers per module estimates a score with an error of order ‖q̃‖‖g̃‖/√k, so on a
language model, whose per-sequence gradients are dominated by tokens that no query is about, rank 16
(k = 256) loses the facts among the noise (benchmarks/results/sketch_probe.md). When the kind of
queries is known before logging — a sample of the evaluation prompts, or of prompts like them — the
sketch can keep exactly the directions those queries see, in the metric of the inverse curvature.

Per module and group, with the K-FAC roots of a first statistics pass over the training data
(R_A = A_λ^{-1/2}, R_S = S_λ^{-1/2}, damping split as in analog.compression.whiten), each query's
whitened gradient is Q̃_b = R_S Q_b R_A with Q_b = Σ_t δ_t a_tᵀ, and a second pass over the query
sample accumulates the two per-side Gram matrices

    M_out = Σ_b Q̃_b Q̃_bᵀ   (G, d_out, d_out),        M_in = Σ_b Q̃_bᵀ Q̃_b   (G, d_in, d_in),

without forming Q̃_b: with Ã_b = a_b R_A (T × d_in) and D̃_b = δ_b R_S (T × d_out),
M_out += D̃_bᵀ (Ã_b Ã_bᵀ) D̃_b and M_in += Ã_bᵀ (D̃_b D̃_bᵀ) Ã_b (several calls of one module in a
block are more positions t of the same example; with ``analog(mask=...)`` the positions are the real
ones only: a and δ arrive zeroed where the mask is 0, as for K-FAC's statistics, analog.capture.masks).
Where T² > d_out·d_in (long sequences, narrow layers)
the T × T kernels are the larger object, and Q̃_b = D̃_bᵀ Ã_b is formed instead; both give the same sums.
The projections are then

    P_out = R_S U_out,   P_in = R_A U_in,   U_side = the top-r eigenvectors of M_side,

so the stored gradient is U_outᵀ G̃ U_in: the whitened gradient restricted to the r × r directions that
hold the most query energy. Inner products of stored gradients equal gᵀ(S_λ ⊗ A_λ)⁻¹g′ exactly for
the part of g′ inside span(R_S U_out) ⊗ span(R_A U_in) — no random error — and ignore the rest; the
``raw`` curvature on the stored gradients then corrects what K-FAC misses in that subspace.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from analog import distributed
from analog.compression.statistics import nonfinite_modules


class QueryGrams:
    """Accumulates M_out, M_in (float64) of whitened query gradients over ``with analog()`` blocks.

    ``roots``: {module: (R_A (G, d_in, d_in), R_S (G, d_out, d_out))}. ``observe`` is the capture's
    observer (a (B, T, G, d_in), d (B, T, G, d_out) per call, uncompressed); ``add_block`` turns one
    block's calls into Gram sums and counts its examples (queries need no ids).
    """

    def __init__(self, roots: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
        self.roots = roots
        self.sums: Dict[str, Dict[str, torch.Tensor]] = {}
        self.n_samples = 0
        self._block: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._converted: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, name, a, d, mask) -> None:
        self._block.setdefault(name, []).append((a, d))

    def discard_block(self) -> None:
        """Drop the calls observed since the last ``add_block`` (a block that raised adds nothing)."""
        self._block = {}

    def add_block(self, n_examples=None) -> None:
        """Add one block's Gram sums; it counts ``n_examples`` (default: the batch its calls had). A block
        whose gradients are not finite adds nothing and raises FloatingPointError naming the modules."""
        block, self._block = self._block, {}
        if n_examples is None:
            n_examples = max((d.shape[0] for calls in block.values() for _, d in calls), default=0)
        grams = {name: self._block_grams(name, calls) for name, calls in block.items()}
        bad = nonfinite_modules((name, m) for name, pair in grams.items() for m in pair)
        if bad:
            raise FloatingPointError(f"non-finite query gradients in module(s) {bad[:5]}: this query block was not "
                                     "added to the query pass (the projections cannot be fitted from NaN/Inf)")
        for name, (m_out, m_in) in grams.items():
            sums = self.sums.setdefault(name, {"out": torch.zeros_like(m_out), "in": torch.zeros_like(m_in)})
            sums["out"] += m_out
            sums["in"] += m_in
        self.n_samples += n_examples

    def _block_grams(self, name, calls):
        """(M_out (G, d_out, d_out), M_in (G, d_in, d_in)) of one block's calls of module ``name``, float64."""
        batch = max(d.shape[0] for _, d in calls)
        a = torch.cat([x.expand(batch, *x.shape[1:]) for x, _ in calls], 1)  # (B, T_total, G, d_in)
        d = torch.cat([y.expand(batch, *y.shape[1:]) for _, y in calls], 1)
        root_a, root_s = self._roots_on(name, a.device, a.dtype)
        a = torch.einsum("btgi,gij->btgj", a, root_a)
        d = torch.einsum("btgo,gop->btgp", d, root_s)
        t, d_out, d_in = a.shape[1], d.shape[-1], a.shape[-1]
        if t * t > d_out * d_in:  # long sequences: the per-query gradients are smaller than the T × T kernels
            q = torch.einsum("btgo,btgi->bgoi", d, a)
            return (torch.einsum("bgoi,bgpi->gop", q, q).double(), torch.einsum("bgoi,bgoj->gij", q, q).double())
        k_a = torch.einsum("btgi,bsgi->bgts", a, a)
        k_d = torch.einsum("btgo,bsgo->bgts", d, d)
        return (torch.einsum("btgo,bgts,bsgp->gop", d, k_a, d).double(),
                torch.einsum("btgi,bgts,bsgj->gij", a, k_d, a).double())

    def _roots_on(self, name: str, device: torch.device, dtype: torch.dtype):
        """The module's roots on the logs' device and dtype, converted once for the whole pass."""
        key = (name, device, dtype)
        if key not in self._converted:
            self._converted[key] = tuple(r.to(device, dtype) for r in self.roots[name])
        return self._converted[key]

    def reduced(self) -> Tuple[int, Dict[str, Dict[str, torch.Tensor]]]:
        """(examples, {module: {"out": M_out, "in": M_in}}) summed over every rank, on the CPU. Does not
        change the running sums, so calling it again (a retried fit) does not count anything twice."""
        n, sums = self.n_samples, {n: dict(sides) for n, sides in self.sums.items()}
        if distributed.is_distributed():
            n = int(distributed.all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)).item())
            for name in sorted(self.roots):  # the same order on every rank; a rank that saw none adds zeros
                root_a, root_s = self.roots[name]
                for side, root in (("out", root_s), ("in", root_a)):
                    local = sums.get(name, {}).get(side, torch.zeros(root.shape, dtype=torch.float64))
                    sums.setdefault(name, {})[side] = distributed.all_reduce_sum(local)
        return n, {name: {s: t.cpu() for s, t in sides.items()} for name, sides in sums.items()}
