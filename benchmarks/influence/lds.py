"""Linear Datamodeling Score (LDS) in plain numpy.

Sign convention (analog's, and every runner in ``peers.py`` is converted to it)::

    score(q, t) = g_qᵀ (H + λI)⁻¹ g_t,   positive = training example t *helps* query q (lowers its loss).

For random training subsets S_1 … S_M (masks, M × n_train) with measured test losses y[m, q] after
retraining on S_m, the attribution predicts the loss of q on S_m as

    ŷ[m, q] = − Σ_{t ∈ S_m} score(q, t)

(a subset full of helpful examples should give a LOW loss, hence the minus sign), and

    LDS = (1/n_test) Σ_q  Spearman_m( ŷ[m, q], y[m, q] ).

A method whose scores have the opposite sign gets exactly −LDS, which is how each peer's sign was checked.
"""

from __future__ import annotations

import numpy as np


def rankdata(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Average ranks (1-based, ties share the mean rank) along ``axis``, like ``scipy.stats.rankdata``."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    flat = a.reshape(-1, a.shape[-1])
    ranks = np.empty_like(flat)
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="mergesort")
        sorted_row = row[order]
        # Each run of equal values [start, end) gets the mean of ranks start+1 … end.
        boundaries = np.flatnonzero(np.diff(sorted_row)) + 1
        starts = np.concatenate([[0], boundaries])
        ends = np.concatenate([boundaries, [len(row)]])
        mean_rank = np.repeat((starts + ends + 1) / 2.0, ends - starts)
        ranks[i, order] = mean_rank
    return np.moveaxis(ranks.reshape(a.shape), -1, axis)


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` with the same column of ``y`` (both M × k)."""
    rx = rankdata(x, axis=0)
    ry = rankdata(y, axis=0)
    rx -= rx.mean(0)
    ry -= ry.mean(0)
    denom = np.sqrt((rx * rx).sum(0) * (ry * ry).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(0) / denom, 0.0)


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """ŷ[m, q] = − Σ_{t ∈ S_m} score(q, t); ``scores`` is n_test × n_train, ``masks`` M × n_train."""
    return -(masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T)


def lds_per_query(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Spearman correlation per test example (length n_test)."""
    scores = np.asarray(scores)
    if scores.shape != (outputs.shape[1], masks.shape[1]):
        raise ValueError(
            f"scores must be n_test × n_train = {(outputs.shape[1], masks.shape[1])}, got {scores.shape}"
        )
    return spearman_columns(predicted_outputs(scores, masks), outputs)


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> float:
    """Mean over test examples of :func:`lds_per_query`."""
    return float(np.mean(lds_per_query(scores, masks, outputs)))
