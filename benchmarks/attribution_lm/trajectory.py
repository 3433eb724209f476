"""Attribution through the training trajectory on the benchmark's tasks (analog.trajectory).

A trajectory method is an analog method of ``harness.py`` with one more entry::

    {"name": "traj4-logra-r16-random-ekfac", "config": {...}, "dampings": [None],
     "trajectory": {"segments": 4, "score": "segment_wise"}}     # or "tracin_cp"

The LM is trained once more by the same routine as the attributed model (``model.train_models``, seed 0,
all rows) and its parameters are kept after K evenly spaced epochs, the last one being the end of training
(``final_drift``: the largest difference between that last checkpoint and the attributed model). For each
checkpoint θ_s analog starts a segment (``new_segment(lr=η_s, epoch=e_s)``, η_s = the learning rate of
the epoch's last step) with a checkpoint of the watched parameters, and logs every training sequence at
θ_s. Scores: ``tracin_cp`` Σ_s η_s g_q(θ_s)ᵀ g_t(θ_s), ``segment_wise`` Σ_s η_s g_q(θ_s)ᵀ (F̂_s + λI)⁻¹
g_t(θ_s), the query gradients at each θ_s through ``analog.at_segment(s)``.

Measured like the harness's rows: ``log_pass_s`` (all segments' logging passes, segment switches and
their curvature fits), ``fit_s`` (the last finalize), ``query_s`` (every query at every segment),
``bytes_per_example`` (logs of all segments ÷ examples) and ``checkpoint_bytes`` (all checkpoints).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from analog import AnaLog, AnaLogScheduler
from analog.trajectory.analysis import TrajectoryInfluence
from benchmarks.attribution_lm.harness import _sync, store_bytes
from benchmarks.attribution_lm.model import train_models

#: (id(task), K) -> [(epoch, lr, state)]: the trajectory is trained once per task and K
_CHECKPOINTS: Dict[Tuple[int, int], List[Tuple[int, float, Dict[str, torch.Tensor]]]] = {}


def checkpoint_epochs(epochs: int, k: int) -> List[int]:
    return sorted({round(epochs * (i + 1) / k) for i in range(k)})


def lm_checkpoints(task, k: int):
    """[(epoch, lr, state)] at K evenly spaced epochs of the attributed LM's training recipe."""
    key = (id(task), k)
    if key not in _CHECKPOINTS:
        cfg, keep, out = task.model_config, set(checkpoint_epochs(task.model_config.epochs, k)), []

        def on_epoch(epoch, params, lr):
            if epoch in keep:
                out.append((epoch, float(lr), {n: v[0].detach().cpu().clone() for n, v in params.items()}))

        rows = torch.arange(task.corpus.n_train)
        train_models(cfg, task.corpus.train_tokens, [rows], [0], task.device, on_epoch=on_epoch)
        _CHECKPOINTS[key] = out
    return _CHECKPOINTS[key]


def run_trajectory(task, method: Dict[str, Any], root: str = None) -> List[Dict[str, Any]]:
    """One row per damping of a trajectory ``method`` on the LM ``task`` (see the module docstring)."""
    spec = method["trajectory"]
    score = spec.get("score", "segment_wise")
    if score not in ("segment_wise", "tracin_cp"):
        raise ValueError(f"trajectory score must be 'segment_wise' or 'tracin_cp', got {score!r}")
    if not hasattr(task, "corpus"):
        raise ValueError("trajectory methods run on the LM task (its training routine keeps the checkpoints)")
    checkpoints = lm_checkpoints(task, int(spec["segments"]))
    config = copy.deepcopy(method.get("config", {}))
    config.update({"progress": False, "log": ["grad"], "save": True,
                   "segments": {"checkpoint": True, "rule": "manual"}})
    config["storage"] = {"dtype": "float32", **config.get("storage", {})}  # as harness.py: float32 unless named
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        config["root_dir"] = tmp
        model = task.fresh_model()
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        drift = max(float((checkpoints[-1][2][k].to(v.device) - v).abs().max()) for k, v in final.items()
                    if k in checkpoints[-1][2])
        run = AnaLog("traj", config).watch(model, name_filter=task.modules)
        _sync(task.device)
        start = time.perf_counter()
        for epoch, lr, state in checkpoints:
            model.load_state_dict(state)
            run.new_segment(lr=lr, epoch=epoch)
            for _ in AnaLogScheduler(run):  # one pass (a statistics pass first for init: pca), then finalize
                for ids, batch in task.train_batches():
                    with run(data_id=ids):
                        task.train_loss(model, batch).backward()
                    model.zero_grad(set_to_none=True)
        _sync(task.device)
        log_s = time.perf_counter() - start
        model.load_state_dict(final)
        run.eval()
        run.add_analysis({"trajectory": TrajectoryInfluence})
        cost = {"log_pass_s": log_s, "fit_s": 0.0, "final_drift": drift, "segments": len(checkpoints),
                "checkpoint_epochs": [e for e, _, _ in checkpoints],
                "bytes_per_example": sum(store_bytes(r.logs(run.path)) for r in run.segments.records) / task.n_train,
                "checkpoint_bytes": sum(p.stat().st_size for p in Path(tmp).rglob("checkpoint.safetensors"))}
        rows = []
        for damping in method.get("dampings", [None]):
            lam = task.damping if damping == "task" else damping
            if damping == "task" and lam is None:
                continue
            scores, seconds = _scores(task, run, model, score, lam)
            rows.append({"method": method["name"], "family": "analog", "damping": damping, "damping_value": lam,
                         "config": method.get("config", {}), "trajectory": spec, "query_s": seconds, **cost,
                         **task.evaluate(scores)})
            if score == "tracin_cp":
                break  # no curvature: one row
        return rows


def _scores(task, run, model, score: str, damping):
    query_fn = lambda: task.query_loss(model)  # noqa: E731
    _sync(task.device)
    start = time.perf_counter()
    if score == "tracin_cp":
        result = run.trajectory.tracin_cp(query_fn)
    else:
        result = run.trajectory.segment_wise(query_fn, damping=damping)
    _sync(task.device)
    seconds = time.perf_counter() - start
    order = np.argsort(np.asarray(result.train_ids))
    if not np.array_equal(np.asarray(result.train_ids)[order], np.arange(task.n_train)):
        raise RuntimeError(f"the segments of {run.project!r} do not hold ids 0..{task.n_train - 1}")
    return result.scores.numpy()[:, order].astype(np.float64), seconds
