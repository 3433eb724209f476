"""LoGra: low-rank gradient projection that never forms the full per-sample gradient.

With P_in ∈ R^{d_in × r_in} and P_out ∈ R^{d_out × r_out} per module (and per group),

    P_outᵀ G_b P_in = P_outᵀ (Σ_t δ_t a_tᵀ) P_in = Σ_t (P_outᵀ δ_t)(P_inᵀ a_t)ᵀ,

so the forward hook keeps ã = a P_in (B, T, G, r_in), the backward hook forms δ̃ = δ P_out, and the
stored per-sample gradient is Σ_t δ̃_t ã_tᵀ of shape (G, r_out, r_in) — memory O(T·r) instead of
O(d_out·d_in) per sample.

``init="random"``: Gaussian entries N(0, 1/r), seeded per module by (seed, module name), so
E⟨P_outᵀG₁P_in, P_outᵀG₂P_in⟩ = ⟨G₁, G₂⟩ and every process builds the same matrices.
``init="pca"``: the top-r eigenvectors of the activation covariance E[a aᵀ] and of the
output-gradient covariance E[δ δᵀ], gathered in a first, uncompressed pass (see ``fit_pca``).
``init="whiten"``: the random matrices premultiplied by the damped inverse square roots of those
covariances, P_in = A_λ^{-1/2} R_in, P_out = S_λ^{-1/2} R_out (see analog.compression.whiten), so the
stored gradients' inner products estimate the K-FAC-preconditioned ones gᵀ(S_λ ⊗ A_λ)⁻¹g′.
``init="whiten_pca"``: the same roots applied to the top-r eigenvectors instead of R (deterministic:
the exact K-FAC-preconditioned product restricted to the top eigen-directions of A and S).
``init="query"``: the same roots applied to the top-r eigenvectors of the whitened *query* gradients'
Gram matrices, gathered in a second pass over a sample of queries (see analog.compression.query):
P = R U, U the directions that hold the most query energy after whitening.
A side whose rank is at least its dimension is left uncompressed (the identity; whitened by the
d × d root itself for ``whiten``).
"""

from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch

from analog.compression.allocate import allocate, whitened_energy
from analog.compression.base import Projector, module_seed, rank_for
from analog.compression.whiten import whitening

#: inits whose projections are fitted from a first statistics pass (K-FAC factors A and S)
FITTED_INITS = ("pca", "whiten", "whiten_pca", "query")


def top_eigenvectors(m: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(all eigenvalues ascending (G, d), the eigenvectors of the r largest, largest first (G, d, r)) of
    symmetric (G, d, d) ``m``, in float64."""
    evals, evecs = torch.linalg.eigh(m.double())
    return evals, evecs[..., -r:].flip(-1)


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) / cols**0.5


class LoGraProjector(Projector, kind="logra"):
    def setup(self, dims: Dict[str, Tuple[int, int, int]]) -> None:
        self.dims = dict(dims)
        if self.init in FITTED_INITS:
            return
        if self.init != "random":
            raise ValueError(f"unknown LoGra init {self.init!r}; use 'random', 'pca', 'whiten', 'whiten_pca' "
                             "or 'query'")
        self.load_tensors(self._random())

    def _random(self) -> Dict[str, torch.Tensor]:
        """{name/side: (G, d, r)} Gaussian N(0, 1/r) matrices for every side with r < d."""
        tensors = {}
        for name, (groups, d_out, d_in) in self.dims.items():
            r_out, r_in = self._rank(name)
            for side, d, r in (("out", d_out, r_out), ("in", d_in, r_in)):
                if r < d:
                    p = gaussian(d, r, module_seed(self.seed, f"{name}/{side}"))
                    tensors[f"{name}/{side}"] = p.unsqueeze(0).expand(groups, d, r).contiguous()
        return tensors

    def needs_fit(self) -> bool:
        return self.init in FITTED_INITS and not self.tensors

    def fit(self, factors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Fit the projections from a statistics pass: ``{name: {"in": A (G, d_in, d_in), "out": S}}``."""
        missing = sorted(set(self.dims) - set(factors))
        if missing:
            raise ValueError(f"the statistics pass has no factors for module(s) {missing}: no gradient reached "
                             "them inside `with analog(...)`")
        if self.allocate == "spectrum":
            self.ranks = self._allocated(factors)
        if self.init == "pca":
            self.fit_pca(factors)
        elif self.init in ("whiten", "whiten_pca"):
            self.fit_whiten(factors)
        elif self.init == "query":  # the roots now; the projections after the query pass (fit_query)
            self.roots = {name: whitening(name, factors[name]["in"], factors[name]["out"], self.damping)[:2]
                          for name in self.dims}
        else:
            raise ValueError(f"LoGra init {self.init!r} is not fitted from statistics")

    def fit_whiten(self, factors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Per side, P = M_λ^{-1/2} R with R Gaussian (``whiten``) or R = the top-r eigenvectors of M
        (``whiten_pca``: P = Q_r diag((e_r + λ)^{-1/2})); the full root M_λ^{-1/2} where r >= d.
        Damping split as in analog.compression.whiten."""
        random = self._random() if self.init == "whiten" else {}
        tensors = {}
        for name, (_, d_out, d_in) in self.dims.items():
            r_out, r_in = self._rank(name)
            root_a, root_s, _, _ = whitening(name, factors[name]["in"], factors[name]["out"], self.damping)
            for side, root, d, r in (("out", root_s, d_out, r_out), ("in", root_a, d_in, r_in)):
                if r >= d:
                    p = root
                elif self.init == "whiten":
                    p = root @ random[f"{name}/{side}"].double()
                else:  # the root maps eigenvector q to q / sqrt(e + λ): keep the top r of them
                    p = root @ top_eigenvectors(factors[name][side], r)[1]
                tensors[f"{name}/{side}"] = p.float().contiguous()
        self.load_tensors(tensors)

    def fit_query(self, grams: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """``init="query"``: P_side = R_side U_side, U the top-r eigenvectors of the whitened query Gram
        M_side (analog.compression.query); the full root where r >= d. Warns, naming the modules, where a
        side's Gram has fewer than r eigenvalues above d·eps(float32) times its largest (fewer query
        directions than the rank: the remaining columns are orthonormal directions no query reached)."""
        missing = sorted(set(self.dims) - set(grams))
        if missing:
            raise ValueError(f"the query pass has no gradients for module(s) {missing}: no query gradient reached "
                             "them inside `with analog(...)`")
        tensors, short = {}, []
        for name, (_, d_out, d_in) in self.dims.items():
            r_out, r_in = self._rank(name)
            root_a, root_s = self.roots[name]
            for side, root, d, r in (("out", root_s, d_out, r_out), ("in", root_a, d_in, r_in)):
                if r >= d:
                    p = root
                else:
                    evals, top = top_eigenvectors(grams[name][side], r)
                    # the Grams are float32 sums: eigenvalues below d·eps32 of the largest are rounding
                    if int((evals > evals[..., -1:] * d * torch.finfo(torch.float32).eps).sum(-1).min()) < r:
                        short.append(f"{name}/{side}")
                    p = root.double() @ top
                tensors[f"{name}/{side}"] = p.float().contiguous()
        if short:
            warnings.warn(f"LoGra init='query': the query pass spans fewer directions than the rank in {short[:5]}"
                          f"{' and more' if len(short) > 5 else ''}; log more (or more varied) queries in it",
                          stacklevel=3)
        self.load_tensors(tensors)
        self.roots = {}

    def _rank(self, name: str):
        """(r_out, r_in): allocated from the spectra (``allocate: spectrum``, after the fit) or configured."""
        ranks = getattr(self, "ranks", None)
        return ranks[name] if ranks else rank_for(name, self.rank)

    def _allocated(self, factors) -> Dict[str, tuple]:
        """Ranks under the configured budget Σ G r_out r_in (see analog.compression.allocate)."""
        budget, energies, groups = 0, {}, {}
        for name, (g, d_out, d_in) in self.dims.items():
            r_out, r_in = rank_for(name, self.rank)
            budget += g * min(r_out, d_out) * min(r_in, d_in)
            energies[name] = whitened_energy(name, factors[name]["in"], factors[name]["out"], self.damping)
            groups[name] = g
        return allocate(energies, groups, budget)

    def fit_pca(self, covariances: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Projections from ``{name: {"in": (G, d_in, d_in), "out": (G, d_out, d_out)}}`` covariances."""
        tensors = {}
        for name, (_, d_out, d_in) in self.dims.items():
            r_out, r_in = self._rank(name)
            for side, d, r in (("out", d_out, r_out), ("in", d_in, r_in)):
                if r < d:
                    tensors[f"{name}/{side}"] = top_eigenvectors(covariances[name][side], r)[1].float().contiguous()
        self.load_tensors(tensors)

    def grad_shape(self, name, dims):
        """(G, r_out, r_in): from the fitted tensors where there are any (allocated ranks), else the config."""
        groups, d_out, d_in = dims
        r_out, r_in = self._rank(name)
        sides = {"out": min(r_out, d_out), "in": min(r_in, d_in)}
        for side in sides:
            if f"{name}/{side}" in self.tensors:
                sides[side] = self.tensors[f"{name}/{side}"].shape[-1]
        return (groups, sides["out"], sides["in"])

    def project_activations(self, name, module, rule, x):
        key = f"{name}/in"
        if key not in self.tensors:
            return rule.activations(module, x)
        p_in = self._on(key, x.device)
        if p_in.shape[0] == 1:
            return rule.project_activations(module, x, p_in[0])
        return torch.einsum("btgd,gdr->btgr", rule.activations(module, x), p_in)

    def project_output_grads(self, name, delta):
        key = f"{name}/out"
        if key not in self.tensors:
            return delta
        return torch.einsum("btgd,gdr->btgr", delta, self._on(key, delta.device))
