"""Runners for the peer libraries: each is ``(task) -> scores``, scores a numpy array n_test × n_train.

Every runner returns analog's orientation and sign (see ``lds.py``): rows are queries (test examples),
columns are training examples, and positive means the training example helps the query (lowers its
loss). Verified on this benchmark by the sign of the LDS (a flipped sign gives exactly −LDS):

=====================  =========================  ====================  =========================
peer                   native orientation         native sign           conversion here
=====================  =========================  ====================  =========================
Kronfluence 1.0.1      query × train              positive = helps      none
TRAK (traker 0.3.2)    train × query              positive = helps      transpose
dattri 0.3.0 (IF)      train × query              positive = helps      transpose
=====================  =========================  ====================  =========================

Curvature and damping, all on the mean-normalised curvature of the training loss (see ``task.py``)
with the same absolute damping λ = ``task.damping``:

- Kronfluence EK-FAC / K-FAC: g_qᵀ (F̂ + λI)⁻¹ g_t, F̂ its Kronecker-factored *true* Fisher (labels sampled
  from the model, its default), ``damping_factor=λ``; ``kronfluence_ekfac_empirical`` uses the empirical
  Fisher (true labels), which is what a Hessian fitted on logged training gradients estimates. On a model
  that fits its training set the empirical Fisher is far smaller than the true Fisher (here its largest
  eigenvalue is ~0.01 against ~0.19 for the Hessian), so the same λ damps it relatively more.
- dattri explicit IF: g_qᵀ (H + λI)⁻¹ g_t with H the exact Hessian of the mean training loss
  (``regularization=λ``); CG: the same system solved by ``CG_ITERATIONS`` conjugate-gradient steps.
- TRAK: one checkpoint, a ``TRAK_PROJ_DIM``-dim Gaussian projection of per-example gradients of its own
  margin measurement, its own (XᵀX)⁻¹ with ``lambda_reg=0`` (TRAK's default; it has no damping in the
  sense above) — TRAK is compared as users run it.

Imports of the peers happen inside the runners, so this module imports without them; ``IMPORTS`` lists
what ``run.py`` imports before starting the clock.
"""

from __future__ import annotations

import logging
import tempfile
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.influence.task import Task

TRAK_PROJ_DIM = 256
CG_ITERATIONS = 50
#: dattri vmaps CG over every test vector of a batch with a full-batch HVP: 600 at once peaked at 20 GB RSS.
CG_TEST_BATCH = 100
IMPORTS = {
    "kronfluence": ("kronfluence", "kronfluence.analyzer"),
    "trak": ("trak",),
    "dattri": ("dattri.task", "dattri.algorithm.influence_function"),
}


# --------------------------------------------------------------------------------------------- Kronfluence
def _kronfluence_task():
    from kronfluence.task import Task as KronTask

    class DigitsTask(KronTask):
        """Summed cross-entropy; with ``sample=True`` labels are drawn from the model (true Fisher)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return DigitsTask()


def _kronfluence_fit(task: Task, strategy: str, workdir: str, empirical: bool = False):
    """Wrap the model, fit the factors; return (analyzer, factors name, train dataset).

    ``empirical=False`` is Kronfluence's default (true Fisher, labels sampled from the model);
    ``empirical=True`` fits the empirical Fisher (true labels), the curvature of logged training gradients.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    torch.manual_seed(0)  # the true-Fisher label sampling
    kron_task = _kronfluence_task()
    model = prepare_model(task.fresh_model(), kron_task)
    analyzer = Analyzer(
        analysis_name="digits",
        model=model,
        task=kron_task,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=workdir,
    )
    train_set = TensorDataset(task.x_train, task.y_train)
    analyzer.fit_all_factors(
        factors_name=strategy,
        dataset=train_set,
        per_device_batch_size=task.n_train,
        factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical),
    )
    return analyzer, strategy, train_set


def _kronfluence_score(task, analyzer, factors_name, train_set, query_idx, scores_name) -> np.ndarray:
    from kronfluence.arguments import ScoreArguments

    query_set = TensorDataset(task.x_test[query_idx], task.y_test[query_idx])
    analyzer.compute_pairwise_scores(
        scores_name=scores_name,
        factors_name=factors_name,
        query_dataset=query_set,
        train_dataset=train_set,
        per_device_query_batch_size=len(query_idx),
        per_device_train_batch_size=task.n_train,
        score_args=ScoreArguments(damping_factor=task.damping),
    )
    scores = analyzer.load_pairwise_scores(scores_name)["all_modules"]  # query × train, positive = helps
    return scores.double().numpy()


def kronfluence_scores(task: Task, strategy: str, empirical: bool = False) -> np.ndarray:
    with tempfile.TemporaryDirectory() as workdir:
        analyzer, name, train_set = _kronfluence_fit(task, strategy, workdir, empirical)
        return _kronfluence_score(task, analyzer, name, train_set, np.arange(task.n_test), "all")


def kronfluence_ekfac(task: Task) -> np.ndarray:
    return kronfluence_scores(task, "ekfac")


def kronfluence_kfac(task: Task) -> np.ndarray:
    return kronfluence_scores(task, "kfac")


def kronfluence_ekfac_empirical(task: Task) -> np.ndarray:
    return kronfluence_scores(task, "ekfac", empirical=True)


def kronfluence_ekfac_repeated(task: Task, query_batches: List[np.ndarray]) -> List[np.ndarray]:
    """Fit EK-FAC once, then one ``compute_pairwise_scores`` call per query batch.

    Kronfluence keeps no training gradients: every call recomputes all n_train per-example gradients.
    """
    with tempfile.TemporaryDirectory() as workdir:
        analyzer, name, train_set = _kronfluence_fit(task, "ekfac", workdir)
        return [
            _kronfluence_score(task, analyzer, name, train_set, idx, f"batch{i}")
            for i, idx in enumerate(query_batches)
        ]


# ---------------------------------------------------------------------------------------------------- TRAK
def trak(task: Task) -> np.ndarray:
    from trak import TRAKer

    model = task.fresh_model()
    with tempfile.TemporaryDirectory() as workdir:
        traker = TRAKer(
            model=model,
            task="image_classification",  # logits model with (x, y) batches: margin measurement
            train_set_size=task.n_train,
            save_dir=workdir,  # fresh and empty; load_from_save_dir=False breaks scoring in 0.3.2
            device="cpu",
            proj_dim=TRAK_PROJ_DIM,
            use_half_precision=False,
            logging_level=logging.WARNING,
        )
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for x, y in DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=250):
            traker.featurize(batch=[x, y], num_samples=len(y))
        traker.finalize_features()
        traker.start_scoring_checkpoint(
            exp_name="digits", checkpoint=model.state_dict(), model_id=0, num_targets=task.n_test
        )
        for x, y in DataLoader(TensorDataset(task.x_test, task.y_test), batch_size=250):
            traker.score(batch=[x, y], num_samples=len(y))
        scores = traker.finalize_scores(exp_name="digits")  # train × query, positive = helps
        return np.asarray(scores, dtype=np.float64).T.copy()


# -------------------------------------------------------------------------------------------------- dattri
def _dattri_scores(task: Task, attributor_cls, test_batch: int, **kwargs) -> np.ndarray:
    from dattri.task import AttributionTask

    model = task.fresh_model()

    def mean_loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    attribution_task = AttributionTask(loss_func=mean_loss, model=model, checkpoints=model.state_dict())
    attributor = attributor_cls(task=attribution_task, device="cpu", regularization=task.damping, **kwargs)
    # One training batch: dattri sums one inverse-HVP per batch of the cached loader, so a single batch
    # gives (H_mean + λI)⁻¹. It rebuilds the Hessian (or reruns CG) for every (train batch, test batch) pair.
    train_loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=task.n_train)
    test_loader = DataLoader(TensorDataset(task.x_test, task.y_test), batch_size=test_batch)
    attributor.cache(train_loader)
    scores = attributor.attribute(train_loader, test_loader)  # train × query, positive = helps
    return scores.detach().double().numpy().T.copy()


def dattri_explicit(task: Task) -> np.ndarray:
    from dattri.algorithm.influence_function import IFAttributorExplicit

    return _dattri_scores(task, IFAttributorExplicit, test_batch=task.n_test)  # one Hessian build


def dattri_cg(task: Task) -> np.ndarray:
    from dattri.algorithm.influence_function import IFAttributorCG

    return _dattri_scores(task, IFAttributorCG, test_batch=CG_TEST_BATCH, max_iter=CG_ITERATIONS)
