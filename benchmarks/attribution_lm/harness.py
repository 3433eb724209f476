"""Run one analog method, given as a plain analog config dict, on one task; measure cost and quality.

A *method* is a dict::

    {"name": "logra-r16-random-ekfac",
     "config": {"compression": {"type": "logra", "rank": 16, "init": "random"}, "hessian": "ekfac"},
     "dampings": [None],          # optional; each value is one result row: a float, None (analog's
                                  # default, 0.1 × mean eigenvalue per module) or "task" (the task's λ)
     "modes": ["dot"],            # optional; influence modes, one row each: dot | cosine | l2
     "calibration": "heldout"}    # optional; the query pass's sample for init: query (tasks.py)

``config`` goes to ``AnaLog(project, config)`` as it is (``root_dir``, ``progress`` and ``log`` are set
here; ``storage.dtype``, when not given, is float32 — the dtype every recorded method without a dtype in
its name was measured with, before analog's default became ``auto``), so any key analog accepts — new
compression inits, curvatures, options — runs without a change to this file. The logging loop is
``for _ in AnaLogScheduler(run)``, so methods with a statistics pass (``init: pca`` and the like) get it;
``init: query``'s query pass runs over ``task.calibration_batches`` (queries other than the evaluated
ones, never the evaluated ones).

Measured per method (on the task's device; CUDA is synchronised around every timed interval):

- ``plain_step_s``: median over the training batches of forward + backward of the training loss without
  analog; ``log_step_s``: the same with ``with run(data_id=ids)`` around it, in the storing pass (the
  statistics pass, if any, is timed separately as ``stats_pass_s``); ``overhead`` = log / plain;
- ``fit_s``: ``finalize()`` (flush, curvature fit, EK-FAC correction / raw covariance read from the store);
- ``bytes_per_example``: the size of the store's row files divided by the number of training examples;
- ``query_s``: the query gradients (one batch of all queries) plus scoring them against the whole store;
- quality: ``task.evaluate(scores)``.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from analog import AnaLog, AnaLogScheduler
from analog.analysis import InfluenceFunction


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def plain_step_s(task, model) -> float:
    """Median time of forward + backward of the training loss per batch (no analog)."""
    times = []
    for _, batch in task.train_batches():
        times.append(_timed(lambda b=batch: task.train_loss(model, b).backward(), task.device))
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:] if len(times) > 2 else times)


def store_bytes(log_dir: Path) -> int:
    return sum(p.stat().st_size for p in log_dir.glob("chunk_*.bin"))


def _log_and_fit(task, run, model, calibration: str = "heldout") -> Dict[str, float]:
    step_times: Dict[str, List[float]] = {}
    total = {"start": time.perf_counter()}
    for phase in AnaLogScheduler(run):
        query_pass = phase == "query"  # LoGra init: query — a sample of queries other than the evaluated ones
        batches = task.calibration_batches(calibration) if query_pass else task.train_batches()
        loss = task.calibration_loss if query_pass else task.train_loss
        for ids, batch in batches:
            def step(ids=ids, batch=batch, loss=loss):
                with run(data_id=ids):
                    loss(model, batch).backward()
                model.zero_grad(set_to_none=True)
            step_times.setdefault(phase, []).append(_timed(step, task.device))
        total[phase] = time.perf_counter()
    end = time.perf_counter()  # AnaLogScheduler called finalize() after the last pass
    logged = step_times["log"]
    return {
        "log_step_s": statistics.median(logged[1:] if len(logged) > 2 else logged),
        "log_pass_s": sum(logged),
        "stats_pass_s": sum(sum(v) for k, v in step_times.items() if k != "log"),
        "fit_s": end - total["log"],
    }


def _scores(task, run, model, damping, mode) -> np.ndarray:
    def query():
        with run():
            task.query_loss(model).backward()
        model.zero_grad(set_to_none=True)
        result = run.influence.compute_influence_all(run.get_log(), run.build_log_dataloader(1024),
                                                     mode=mode, damping=damping)
        holder["result"] = result

    holder: Dict[str, Any] = {}
    seconds = _timed(query, task.device)
    result = holder["result"]
    order = np.argsort(np.asarray(result.train_ids))
    if not np.array_equal(np.asarray(result.train_ids)[order], np.arange(task.n_train)):
        raise RuntimeError(f"the store of {run.project!r} does not hold ids 0..{task.n_train - 1}")
    return result.scores.numpy()[:, order].astype(np.float64), seconds


def run_analog(task, method: Dict[str, Any], root: str = None) -> List[Dict[str, Any]]:
    """One row per damping of ``method`` on ``task`` (see the module docstring)."""
    config = copy.deepcopy(method.get("config", {}))
    config.update({"progress": False, "log": ["grad"], "save": True})
    config["storage"] = {"dtype": "float32", **config.get("storage", {})}  # see the module docstring
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        config["root_dir"] = tmp
        model = task.fresh_model()
        plain = plain_step_s(task, model)
        run = AnaLog("bench", config).watch(model, name_filter=task.modules)
        cost = _log_and_fit(task, run, model, method.get("calibration", "heldout"))
        cost.update(plain_step_s=plain, overhead=cost["log_step_s"] / plain,
                    bytes_per_example=store_bytes(run.log_path) / task.n_train,
                    dims=_dims(run))
        run.eval()
        run.add_analysis({"influence": InfluenceFunction})
        rows = []
        for damping in method.get("dampings", [None]):
            lam = task.damping if damping == "task" else damping
            if damping == "task" and lam is None:
                continue
            for mode in method.get("modes", ["dot"]):
                scores, seconds = _scores(task, run, model, lam, mode)
                rows.append({"method": method["name"], "family": "analog", "damping": damping, "mode": mode,
                             "damping_value": lam, "config": method.get("config", {}), "query_s": seconds,
                             **cost, **task.evaluate(scores)})
        return rows


def _dims(run) -> Dict[str, int]:
    """Logged gradient size per module (numbers per example)."""
    store = run.open_store()
    return {f["module"]: int(np.prod(f["shape"])) for f in store.fields if f["kind"] == "grad"}
