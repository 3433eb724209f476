"""Dense random projection (Johnson–Lindenstrauss) of the flattened per-sample gradient.

g̃ = Rᵀ vec(G) with R ∈ R^{D × k}, entries N(0, 1/k), seeded per module, so E⟨g̃₁, g̃₂⟩ = ⟨g₁, g₂⟩
and, for k large enough, |⟨g̃₁, g̃₂⟩ − ⟨g₁, g₂⟩| ≲ ‖g₁‖‖g₂‖·sqrt(2/k) with high probability.
Unlike LoGra it needs the full per-sample gradient (D = G·d_out·d_in) and a D × k matrix per module;
use it for small layers or as a reference. Curvature that needs Kronecker factors (K-FAC, EK-FAC)
is not defined on these logs: fit ``raw``, ``diagonal`` or ``none``.
"""

from __future__ import annotations

from typing import Dict, Tuple

from analog.compression.base import Projector, module_seed, rank_for
from analog.compression.logra import gaussian


class DenseProjector(Projector, kind="dense"):
    def setup(self, dims: Dict[str, Tuple[int, int, int]]) -> None:
        if self.init != "random":
            raise ValueError("the dense projection supports only init='random'")
        tensors = {}
        for name, (groups, d_out, d_in) in dims.items():
            k = rank_for(name, self.rank)[0]
            tensors[f"{name}/dense"] = gaussian(groups * d_out * d_in, k, module_seed(self.seed, name))
        self.load_tensors(tensors)

    def grad_shape(self, name, dims):
        return (rank_for(name, self.rank)[0],)

    def compress_grad(self, name, grad):
        return grad.reshape(grad.shape[0], -1) @ self._on(f"{name}/dense", grad.device)
