"""analog's entries in the influence benchmark (picked up by ``run.py``).

Every method logs the training set's per-example gradients (cross-entropy summed over a batch, so
g_i = ∇θ CE_i), fits its curvature on the mean-normalised Fisher F = (1/N) Σ g gᵀ, adds the task's
damping λ, and scores g_qᵀ (F̂ + λI)⁻¹ g_t (positive = helps). The timed call includes logging,
fitting and scoring; logs go to a temporary directory. Rows marked ``-heuristic`` use analog's
default damping instead (0.1 × mean eigenvalue per module), for reference.
"""

from __future__ import annotations

import tempfile
from functools import partial
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from analog import AnaLog, AnaLogScheduler
from analog.analysis import InfluenceFunction

BATCH = 250


def _fit(task, root: str, hessian: str, compression: dict, damping: Optional[float]):
    model = task.fresh_model()
    # float32 rows: the recorded results (results/compression*.md) were measured so (analog's default: auto)
    run = AnaLog("bench", {"root_dir": root, "compression": compression, "progress": False,
                           "storage": {"dtype": "float32"}})
    run.update({"log": ["grad"], "hessian": hessian, "save": True, "damping": damping})
    run.watch(model)
    for _ in AnaLogScheduler(run):  # two passes for LoGra init="pca", one otherwise
        for start in range(0, task.n_train, BATCH):
            idx = list(range(start, min(start + BATCH, task.n_train)))
            with run(data_id=idx):
                F.cross_entropy(model(task.x_train[idx]), task.y_train[idx], reduction="sum").backward()
            model.zero_grad(set_to_none=True)
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run, model


def _score(run, model, task, query_idx) -> np.ndarray:
    idx = torch.as_tensor(query_idx)
    with run():
        F.cross_entropy(model(task.x_test[idx]), task.y_test[idx], reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return run.influence.compute_influence_all(run.get_log(), run.build_log_dataloader(1000)).scores.numpy()


def method(task, hessian: str, compression: dict, heuristic: bool = False) -> np.ndarray:
    with tempfile.TemporaryDirectory() as root:
        run, model = _fit(task, root, hessian, compression, None if heuristic else task.damping)
        return _score(run, model, task, np.arange(task.n_test))


def repeated(task, query_batches: List[np.ndarray], hessian: str, compression: dict) -> List[np.ndarray]:
    """Log and fit once; score each query batch from the stored logs."""
    with tempfile.TemporaryDirectory() as root:
        run, model = _fit(task, root, hessian, compression, task.damping)
        return [_score(run, model, task, batch) for batch in query_batches]


NONE = {"type": "none"}


def logra(rank: int, init: str = "random") -> dict:
    return {"type": "logra", "rank": rank, "seed": 0, "init": init}


METHODS = {
    "analog-ekfac": partial(method, hessian="ekfac", compression=NONE),
    "analog-kfac": partial(method, hessian="kfac", compression=NONE),
    "analog-raw": partial(method, hessian="raw", compression=NONE),
    "analog-raw-logra-r16": partial(method, hessian="raw", compression=logra(16)),
    "analog-raw-logra-r8": partial(method, hessian="raw", compression=logra(8)),
    "analog-raw-logra-r4": partial(method, hessian="raw", compression=logra(4)),
    "analog-raw-logra-pca-r16": partial(method, hessian="raw", compression=logra(16, "pca")),
    "analog-raw-logra-pca-r8": partial(method, hessian="raw", compression=logra(8, "pca")),
    "analog-ekfac-logra-r16": partial(method, hessian="ekfac", compression=logra(16)),
    "analog-identity": partial(method, hessian="none", compression=NONE),
    "analog-ekfac-heuristic": partial(method, hessian="ekfac", compression=NONE, heuristic=True),
    "analog-kfac-heuristic": partial(method, hessian="kfac", compression=NONE, heuristic=True),
}

REPEATED_QUERY_METHODS = {
    "analog-ekfac": partial(repeated, hessian="ekfac", compression=NONE),
}
