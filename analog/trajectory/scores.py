"""Scores through the training trajectory, from per-segment stores and curvatures.

For segments s = 1..S with learning rate η_s, parameters θ_s (the segment's checkpoint), logged
training gradients g_t(θ_s) and curvature F̂_s fitted on segment s's logs only:

    TracIn-CP:         score(q, t) = Σ_s η_s g_q(θ_s)ᵀ g_t(θ_s)
    segment-wise:      score(q, t) = Σ_s η_s g_q(θ_s)ᵀ (F̂_s + λI)⁻¹ g_t(θ_s)

(the second is the stationary-segment simplification of SOURCE, Bae et al. 2024: one EK-FAC per
segment, without the propagation factors between segments). Per module blocks as in
analog.analysis.influence; positive = up-weighting t lowers q's loss. A training id absent from a
segment contributes nothing for that segment (TracIn counts the steps where t was seen), so the
columns are the union of the segments' ids, in order of first appearance.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from analog.storage import LogStore
from analog.trajectory.layout import id_key

#: (training ids, scores of shape (n_query, len(ids)))
SegmentScores = Tuple[List[Any], torch.Tensor]


def segment_scores(query: Dict[str, torch.Tensor], store: LogStore, curvature=None,
                   damping: Optional[float] = None, batch_size: int = 1024) -> SegmentScores:
    """g_qᵀ (F̂ + λI)⁻¹ g_t of the query gradients ``{module: (n_query, *shape)}`` against every example
    of ``store`` (analog.analysis.InfluenceFunction built from the parts); ``curvature=None`` is the
    identity (plain gradient dot products, no damping)."""
    from analog.analysis import InfluenceFunction
    from analog.hessian import build_curvature
    from analog.storage import build_log_dataloader

    if curvature is None:
        curvature = build_curvature("none")
        curvature.meta["finalized"] = True  # the identity has nothing to fit
    n_query = len(next(iter(query.values())))
    log = (list(range(n_query)), {m: {"grad": g} for m, g in query.items()})
    influence = InfluenceFunction.from_parts(curvature, store, damping)
    result = influence.compute_influence_all(log, build_log_dataloader(store, batch_size), progress=False)
    return result.train_ids, result.scores


def weighted_sum(parts: Sequence[Tuple[float, SegmentScores]]) -> SegmentScores:
    """Σ_s w_s · scores_s over segments, aligned by training id (absent ids count zero)."""
    if not parts:
        raise ValueError("no segment to sum over")
    columns: Dict[Any, int] = {}
    ids_out: List[Any] = []
    for _, (ids, _) in parts:
        for i in ids:
            if id_key(i) not in columns:
                columns[id_key(i)] = len(columns)
                ids_out.append(i)
    n_query = parts[0][1][1].shape[0]
    total = torch.zeros(n_query, len(columns), dtype=torch.float64)
    for weight, (ids, scores) in parts:
        if scores.shape[0] != n_query:
            raise ValueError(f"segments scored {scores.shape[0]} and {n_query} queries: not the same queries")
        index = torch.tensor([columns[id_key(i)] for i in ids], dtype=torch.long)
        total.index_add_(1, index, weight * scores.double())
    return ids_out, total.float()
