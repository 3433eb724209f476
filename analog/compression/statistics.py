"""The statistics pass of LoGra inits fitted from data (``pca``, ``whiten``, ``whiten_pca``, ``query``).

Inside each ``with analog(...)`` block of the pass the capture hands every call's uncompressed layer
inputs a (B, T, G, d_in) and output gradients δ (B, T, G, d_out) to ``observe``, which adds their
K-FAC factor sums (analog.hessian.kfac) to the open block's. A block's sums and examples join the
pass only when it ends cleanly (``add_block``): a block that raised is dropped by the next block's
``discard_block``, and one whose sums are not finite is refused, naming the modules. After the pass,
``factors()`` gives each module's A = E[a aᵀ] (over positions) and S = E[δ δᵀ] (over examples),
summed over torch.distributed ranks; a rank that ran no block of the pass adds zeros (the facade gives
it an empty ``StatisticsPass``), so the factors are those of one process over every rank's data.

``QueryGrams`` (analog.compression.query) is the same kind of object for the query pass of
``init="query"``: ``observe``, ``discard_block``, ``add_block``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

from analog import distributed
from analog.hessian import build_curvature
from analog.hessian.base import add_sums


def nonfinite_modules(named: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """The module names (sorted, once each) whose tensors hold NaN or ±Inf; one device sync when all
    are finite."""
    named = list(named)
    if not named:
        return []
    flags = torch.stack([~torch.isfinite(t).all() for _, t in named])
    if not bool(flags.any()):
        return []
    return sorted({name for (name, _), bad in zip(named, flags.tolist()) if bad})


class StatisticsPass:
    """K-FAC factor sums of a statistics pass, added block by block (module docstring)."""

    def __init__(self):
        self.curvature = build_curvature("kfac")
        self._block: Dict[str, torch.Tensor] = {}
        self._batch = 0  # the largest batch the open block's calls had: its examples when it has no ids

    @property
    def n_samples(self) -> int:
        return self.curvature.meta["n_samples"]

    def observe(self, name, a, d, mask) -> None:
        add_sums(self._block, self.curvature.batch_stats([(name, a, d, mask)]))
        self._batch = max(self._batch, d.shape[0])

    def discard_block(self) -> None:
        """Drop what was observed since the last ``add_block`` (a block that raised adds nothing)."""
        self._block, self._batch = {}, 0

    def add_block(self, n_examples: Optional[int] = None) -> None:
        """Add the open block's sums and ``n_examples`` (default: the batch its calls had); a block whose
        sums are not finite adds nothing and raises FloatingPointError naming the modules."""
        block, batch = self._block, self._batch
        self.discard_block()
        bad = nonfinite_modules((key.rsplit("/", 1)[0], t) for key, t in block.items())
        if bad:
            raise FloatingPointError(f"non-finite activations or gradients in module(s) {bad[:5]} in the statistics "
                                     "pass: this block was not added (the projections cannot be fitted from NaN/Inf)")
        self.curvature.absorb(block, batch if n_examples is None else n_examples)

    def examples(self) -> int:
        """The examples of the pass summed over ranks (collective until ``factors`` summed them, then the sum)."""
        if self.curvature.meta["finalized"]:
            return self.n_samples
        return distributed.total(self.n_samples)

    def factors(self, modules: Iterable[str]) -> Dict[str, Dict[str, torch.Tensor]]:
        """{module: {"in": A, "out": S}} of the ``modules`` the pass reached (summed over ranks)."""
        self.curvature.finalize()
        state = self.curvature.state
        return {m: {"in": state[f"{m}/A"], "out": state[f"{m}/S"]} for m in modules if f"{m}/A" in state}
