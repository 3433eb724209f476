"""Judging attribution: linear datamodeling score (LDS) and mislabel detection.

LDS (Park et al., 2023): for subsets S_1..S_M of the training set (masks M × n_train) and measured
query outputs f_q(S_k) of models trained on them (M × n_query, e.g. the query loss), the attribution
predicts Σ_{t∈S_k} τ(q, t). With analog's sign (positive = helps = lowers the loss), the prediction
of the *loss* is −Σ τ, and

    LDS = mean_q  Spearman_k( −Σ_{t∈S_k} τ(q, t),  f_q(S_k) ).

Mislabel detection ranks training examples by self-influence (high first): AUC of that ranking
against the true flags, and recall of flagged examples in the top k %.
"""

from __future__ import annotations

from typing import Dict

import torch


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along dim 0 (ties share their mean rank)."""
    order = x.argsort(0)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks.scatter_(0, order, torch.arange(x.shape[0], dtype=torch.float64)[:, None].expand_as(x).contiguous())
    for j in range(x.shape[1]):
        col = x[:, j]
        uniq, inverse = torch.unique(col, return_inverse=True)
        if len(uniq) < len(col):
            sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[:, j])
            counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks[:, j]))
            ranks[:, j] = (sums / counts)[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Spearman correlation of (M, Q) tensors -> (Q,)."""
    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    return (ra * rb).sum(0) / (ra.norm(dim=0) * rb.norm(dim=0)).clamp_min(1e-30)


def lds(scores: torch.Tensor, masks: torch.Tensor, outputs: torch.Tensor) -> Dict[str, object]:
    """LDS of ``scores`` (n_query × n_train) against subset ``masks`` (M × n_train) and ``outputs`` (M × n_query)."""
    if masks.shape[1] != scores.shape[1] or outputs.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes do not fit: scores {tuple(scores.shape)}, masks {tuple(masks.shape)}, "
                         f"outputs {tuple(outputs.shape)}")
    predicted = -(masks.double() @ scores.double().T)  # (M, n_query)
    per_query = spearman(predicted, outputs.double())
    return {"lds": float(per_query.mean()), "per_query": per_query}


def mislabel_detection(self_influence: torch.Tensor, is_flipped: torch.Tensor, top_fraction: float = 0.05):
    """AUC and recall@top_fraction of flagged examples when ranking by self-influence (descending)."""
    s, y = self_influence.double().flatten(), is_flipped.bool().flatten()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("mislabel detection needs both flipped and clean examples")
    ranks = _rank(s[:, None])[:, 0] + 1
    auc = (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    k = max(1, int(round(top_fraction * len(s))))
    top = s.topk(k).indices
    found = int(y[top].sum())
    return {"auc": float(auc), "found": found, "recall": found / n_pos, "k": k, "n_flipped": n_pos}
