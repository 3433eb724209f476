"""Kronfluence EK-FAC, the peer, on the same tasks and the same trained models as analog's methods.

Kronfluence fits Kronecker factors and EK-FAC eigenvalues (by default on the *true* Fisher: labels
sampled from the model; ``empirical=True`` uses the training labels, which is what curvature fitted on
logged training gradients estimates), stores nothing per example and recomputes every training
gradient when it scores. Scores are query × train, positive = helps (analog's convention, no change).
Damping ``None`` is Kronfluence's heuristic, 0.1 × the mean eigenvalue, as analog's default.

LM: the tracked modules are the same ``blocks.*.{qkv,proj,fc1,fc2}`` Linear layers analog watches; the
training loss is the summed next-token cross-entropy of a sequence, the measurement the answer token's
cross-entropy. Digits: ``benchmarks/influence/peers.py``'s runner.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks.attribution_lm.model import answer_loss


def _lm_task(modules):
    from kronfluence.task import Task as KronTask

    class FactTask(KronTask):
        def compute_train_loss(self, batch, model, sample=False):
            tokens = batch[0]
            logits = model(tokens)[:, :-1].flatten(0, 1)
            targets = tokens[:, 1:].flatten()
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1).flatten()
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            tokens, pos = batch
            return answer_loss(model(tokens), tokens, pos).sum()

        def get_influence_tracked_modules(self):
            return list(modules)

    return FactTask()


def kronfluence_lm(task, strategy: str = "ekfac", empirical: bool = False,
                   damping: Optional[float] = None) -> Dict[str, Any]:
    """Fit + score on the LM task; returns the row (quality, fit_s, query_s)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.manual_seed(0)
    kron_task = _lm_task(task.modules)
    model = prepare_model(task.fresh_model(), kron_task)
    train = TensorDataset(task.corpus.train_tokens)
    queries = TensorDataset(task.corpus.query_tokens, task.corpus.query_answer_pos)
    with tempfile.TemporaryDirectory() as workdir:
        analyzer = Analyzer(analysis_name="facts", model=model, task=kron_task, cpu=task.device == "cpu",
                            log_level=logging.WARNING, disable_tqdm=True, output_dir=workdir)
        start = time.perf_counter()
        analyzer.fit_all_factors(factors_name=strategy, dataset=train, per_device_batch_size=task.batch,
                                 factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical),
                                 overwrite_output_dir=True)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name="q", factors_name=strategy, query_dataset=queries,
                                         train_dataset=train, per_device_query_batch_size=task.n_queries,
                                         per_device_train_batch_size=task.batch,
                                         score_args=ScoreArguments(damping_factor=damping),
                                         overwrite_output_dir=True)
        query = time.perf_counter() - start
        scores = analyzer.load_pairwise_scores("q")["all_modules"].double().cpu().numpy()
    return {"fit_s": fit, "query_s": query, **task.evaluate(scores)}


def kronfluence_digits(task, strategy: str = "ekfac", empirical: bool = False,
                       damping: Optional[float] = None) -> Dict[str, Any]:
    import dataclasses

    from benchmarks.influence import peers

    inner = dataclasses.replace(task.inner, damping=damping)
    start = time.perf_counter()
    scores = peers.kronfluence_scores(inner, strategy, empirical)
    return {"fit_s": float("nan"), "query_s": time.perf_counter() - start, **task.evaluate(np.asarray(scores))}


def run_peer(task, peer: Dict[str, Any]) -> Dict[str, Any]:
    """``peer``: {"name", "strategy", "empirical", "damping"} (damping "task" = the task's λ)."""
    damping = task.damping if peer.get("damping") == "task" else peer.get("damping")
    fn = kronfluence_digits if task.name == "digits" else kronfluence_lm
    row = fn(task, peer.get("strategy", "ekfac"), peer.get("empirical", False), damping)
    return {"method": peer["name"], "family": "peer", "damping": peer.get("damping"), "damping_value": damping,
            "config": {k: v for k, v in peer.items() if k != "name"}, "bytes_per_example": 0.0, **row}
