"""Subset retraining on the fact corpus: the LDS target of the LM task.

M random halves S_1 … S_M of the training sequences (``draw_masks`` of benchmarks/influence, seeded).
On each, the LM is retrained from scratch with exactly the recipe of the attributed model
(``model.train_models``: same epochs, batch, schedule; half the steps) from each init seed in ``seeds``,
all copies at once under ``vmap``. The target is each query's answer-token cross-entropy, mean over seeds:

    outputs[m, q] = (1/|seeds|) Σ_s CE_answer( f_{θ_s(S_m)}, query q )

``benchmarks.influence.lds.lds(scores, masks, outputs)`` then gives the LDS. Returned dict: ``masks``
(M × N bool), ``outputs`` (M × Q), ``outputs_per_seed`` (M × |seeds| × Q), ``seed_consistency`` and the
retraining time. Chunks of ``chunk`` copies train at a time (memory).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from benchmarks.attribution_lm.corpus import Corpus
from benchmarks.attribution_lm.model import ModelConfig, answer_loss, train_models
from benchmarks.influence.ground_truth import draw_masks, seed_consistency


@torch.no_grad()
def query_losses(model, corpus: Corpus, device) -> np.ndarray:
    tokens, pos = corpus.query_tokens.to(device), corpus.query_answer_pos.to(device)
    return answer_loss(model(tokens), tokens, pos).double().cpu().numpy()


def retrain(corpus: Corpus, cfg: ModelConfig, n_subsets: int, seeds: Sequence[int], device, chunk: int = 64,
            mask_seed: int = 1234, progress: bool = False) -> dict:
    start = time.perf_counter()
    masks = draw_masks(corpus.n_train, n_subsets, 0.5, mask_seed)
    jobs = [(m, j, s) for m in range(n_subsets) for j, s in enumerate(seeds)]
    per_seed = np.zeros((n_subsets, len(seeds), corpus.query_tokens.shape[0]))
    for at in range(0, len(jobs), chunk):
        part = jobs[at:at + chunk]
        subsets = [torch.from_numpy(np.flatnonzero(masks[m])) for m, _, _ in part]
        models = train_models(cfg, corpus.train_tokens, subsets, [s for _, _, s in part], device,
                              order_seed=1 + at, progress=progress)
        for (m, j, _), model in zip(part, models):
            per_seed[m, j] = query_losses(model, corpus, device)
    return {"masks": masks, "outputs": per_seed.mean(1), "outputs_per_seed": per_seed,
            "seed_consistency": seed_consistency(per_seed), "seconds": time.perf_counter() - start,
            "n_subsets": n_subsets, "seeds": list(seeds)}
