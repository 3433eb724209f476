"""Attribution through the training trajectory: ``analog.add_analysis({"trajectory": TrajectoryInfluence})``.

For each segment s the query step is run with the segment's parameters θ_s put into the model
(``analog.at_segment(s)``: its checkpoint, restored afterwards), the query gradients g_q(θ_s) are
captured, and they meet segment s's logged training gradients:

    tracin_cp(query_fn):     Σ_s η_s g_q(θ_s)ᵀ g_t(θ_s)
    segment_wise(query_fn):  Σ_s η_s g_q(θ_s)ᵀ (F̂_s + λI)⁻¹ g_t(θ_s),   F̂_s fitted on segment s's logs

``query_fn()`` runs the query forward pass on the user's model and returns the loss to differentiate
(summed over the query batch, like the training loss: ``reduction="sum"``). See analog.trajectory.scores.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from analog.analysis.results import InfluenceScores
from analog.trajectory.scores import segment_scores, weighted_sum


class TrajectoryInfluence:
    """Scores summed over a project's segments (all of them unless ``segments`` names some)."""

    def __init__(self, analog):
        self.analog = analog

    def query_gradients(self, query_fn: Callable[[], torch.Tensor], segment: int):
        """(ids, {module: grad (B, *shape)}) of ``query_fn``'s loss at segment ``segment``'s parameters."""
        if self.analog.mode != "eval":
            raise RuntimeError("trajectory queries run in analysis mode: call analog.eval() after logging")
        with self.analog.at_segment(segment):
            with self.analog():
                query_fn().backward()
            ids, logs = self.analog.get_log()
        grads = {m: kinds["grad"] for m, kinds in logs.items() if "grad" in kinds}
        if not grads:
            raise ValueError("the query step logged no gradients; log with update({'log': ['grad']})")
        return ids, grads

    def scores(self, query_fn: Callable[[], torch.Tensor], curvature: bool,
               segments: Optional[Sequence[int]] = None, damping: Optional[float] = None,
               batch_size: int = 1024) -> InfluenceScores:
        """Σ_s η_s g_q(θ_s)ᵀ P_s g_t(θ_s) with P_s = (F̂_s + λI)⁻¹ (``curvature=True``) or I."""
        analog = self.analog
        indices = list(range(len(analog.segments))) if segments is None else [int(s) for s in segments]
        if not indices:
            raise ValueError("segments is empty: name at least one segment to score")
        damping = analog.config.damping if damping is None else damping
        parts: List[Any] = []
        query_ids = None
        for s in tqdm(indices, desc="segments", disable=not analog.progress, leave=False):
            ids, grads = self.query_gradients(query_fn, s)
            if query_ids is not None and list(ids) != list(query_ids):
                raise ValueError(f"the query step gave ids {list(ids)[:5]}... at segment {s} but {query_ids[:5]}... "
                                 "before: query_fn must run the same queries every time")
            query_ids = list(ids)
            with analog.at_segment(s, parameters=False):
                fitted = analog.curvature if curvature else None
                parts.append((analog.segments.record(s).lr,
                              segment_scores(grads, analog.open_store(), fitted, damping, batch_size)))
        train_ids, total = weighted_sum(parts)
        return InfluenceScores(total, query_ids, train_ids)

    def tracin_cp(self, query_fn, segments=None, batch_size: int = 1024) -> InfluenceScores:
        """TracIn-CP: Σ_s η_s g_q(θ_s)ᵀ g_t(θ_s) over the segments."""
        return self.scores(query_fn, False, segments, batch_size=batch_size)

    def segment_wise(self, query_fn, segments=None, damping: Optional[float] = None,
                     batch_size: int = 1024) -> InfluenceScores:
        """Σ_s η_s g_q(θ_s)ᵀ (F̂_s + λI)⁻¹ g_t(θ_s), one fitted curvature per segment."""
        return self.scores(query_fn, True, segments, damping, batch_size)
