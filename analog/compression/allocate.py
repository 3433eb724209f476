"""Per-module, per-side LoGra ranks from the statistics pass under one byte budget (``allocate: spectrum``).

The configured ranks fix the budget, B = Σ_m G_m · r_out,m · r_in,m numbers per example. After the
statistics pass each side's spectrum is whitened with its share of the damping (λ_A, λ_S as in
analog.compression.whiten): w_j = e_j / (e_j + λ_side) ∈ [0, 1), sorted descending, and
C(r) = Σ_{j<r} w_j is the whitened energy the top r directions keep. Under K-FAC the kept part of
module m's whitened Fisher has trace C_S,m(r_out) · C_A,m(r_in), so the ranks are chosen greedily to
maximise Σ_m C_S,m(r_out) C_A,m(r_in) subject to Σ_m G_m r_out r_in ≤ B: starting from (1, 1) per
module, each step adds one direction to the side with the largest gain per added number.

Where the spectra are flat (inputs of a small MLP on standardised pixels) this moves rank from the
output side to the input side; it never exceeds a side's dimension.
"""

from __future__ import annotations

import heapq
from typing import Dict, Tuple

import torch

from analog.compression.whiten import split_damping


def whitened_energy(name: str, a: torch.Tensor, s: torch.Tensor, damping) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cumulative whitened energy per side, (C_S, C_A) with C[r] = Σ_{j<r} w_j (C[0] = 0), groups pooled."""
    eig_a, eig_s = torch.linalg.eigvalsh(a.double()).clamp_min(0), torch.linalg.eigvalsh(s.double()).clamp_min(0)
    lam_a, lam_s = split_damping(name, eig_a, eig_s, damping)
    out = []
    for eig, lam in ((eig_s, lam_s), (eig_a, lam_a)):
        w = (eig / (eig + lam)).mean(0).sort(descending=True).values  # mean over groups: one rank for all
        out.append(torch.cat([w.new_zeros(1), w.cumsum(0)]))
    return out[0], out[1]


def allocate(energies: Dict[str, Tuple[torch.Tensor, torch.Tensor]], groups: Dict[str, int],
             budget: int) -> Dict[str, Tuple[int, int]]:
    """{module: (r_out, r_in)} maximising Σ C_S(r_out) C_A(r_in) with Σ G r_out r_in ≤ budget (greedy)."""
    ranks = {m: [1, 1] for m in energies}
    used = sum(groups[m] for m in energies)
    if used > budget:
        raise ValueError(f"a rank budget of {budget} numbers per example cannot give every one of the "
                         f"{len(energies)} modules rank 1 on both sides")

    def candidates(m):
        c_s, c_a = energies[m]
        r_o, r_i = ranks[m]
        if r_o < len(c_s) - 1:  # one more output direction costs r_in numbers per group
            yield (c_s[r_o + 1] - c_s[r_o]) * c_a[r_i] / (groups[m] * r_i), 0, groups[m] * r_i
        if r_i < len(c_a) - 1:
            yield c_s[r_o] * (c_a[r_i + 1] - c_a[r_i]) / (groups[m] * r_o), 1, groups[m] * r_o

    heap = [(-float(g), m, side, cost) for m in energies for g, side, cost in candidates(m)]
    heapq.heapify(heap)
    while heap:
        _, m, side, cost = heapq.heappop(heap)
        if used + cost > budget:
            continue
        ranks[m][side] += 1
        used += cost
        heap = [h for h in heap if h[1] != m]  # m's other entry is stale now
        for g, s, c in candidates(m):
            heap.append((-float(g), m, s, c))
        heapq.heapify(heap)
    return {m: (r[0], r[1]) for m, r in ranks.items()}
