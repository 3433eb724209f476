"""Worker for ``AnaLog.update()`` called on one rank only, or with different values on different ranks (a real
2-process gloo group). Settings that every rank must hold alike are compared at the next collective step
analog runs anyway (the check at a pass's first block, finalize(), distributed scoring): every rank raises
the same RankError there, naming the setting, each rank's value and the ranks whose update() set it. Keys
that may differ per rank (progress, storage.flush_bytes, fit_bytes; damping until scoring) raise nothing."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from distributed_helpers import loss_fn, make_data, make_model, query, shard

CONFIG = {"log": ["grad"], "save": True, "hessian": "kfac", "progress": False, "damping": None,
          "storage": {"dtype": "float32"}, "compression": {"type": "logra", "rank": 2, "seed": 3}}
#: scenario -> (the update() each rank makes before logging, by rank; None: none)
SCENARIOS = {
    # the hang found: one rank checkpoints segments, so finalize's end-of-segment collectives differed
    "checkpoint_one_rank": [None, {"segments": {"checkpoint": True}}],
    # a key fixed once logging starts, after watch(): update() rebuilds the projection (collective) on rank 1
    "hessian_after_watch": [None, {"hessian": "raw"}],
    # different values on both ranks
    "nonfinite_both": [{"nonfinite": "allow"}, {"nonfinite": "error"}],
    # per-rank keys: no error, and the run finishes
    "per_rank": [{"progress": False, "storage": {"flush_bytes": 1}}, {"fit_bytes": 2**20}],
}


def _log(run, model, rank, world):
    x, y, _, _ = make_data()
    for ids in shard(rank, world):
        with run(data_id=ids):
            loss_fn(model(x[ids]), y[ids]).backward()
        model.zero_grad()


def _attempt(out, key, fn):
    start = time.monotonic()
    try:
        fn()
        out[key] = None
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        out[key] = f"{type(e).__name__}: {e}"
    out[f"{key}_seconds"] = time.monotonic() - start


def worker_update(rank, world, tmp, root):
    from analog import AnaLog
    from analog.analysis import InfluenceFunction

    out = {}
    for name, updates in SCENARIOS.items():
        model = make_model()
        run = AnaLog(name, {"root_dir": str(root), **CONFIG}).watch(model)

        def scenario(run=run, model=model, update=updates[rank]):
            if update is not None:
                run.update(update)
            _log(run, model, rank, world)
            run.finalize()

        _attempt(out, name, scenario)
    # damping may differ while each rank scores alone; distributed scoring compares it
    run.eval().add_analysis({"influence": InfluenceFunction})
    q = query(run, model)
    if rank == 1:
        run.update({"damping": 0.5})
    alone = run.influence.compute_influence_all(q, progress=False)  # this rank alone: allowed
    _attempt(out, "damping_scoring", lambda: run.influence.compute_influence_all(q, distributed=True,
                                                                                 progress=False))
    run.update({"damping": 0.5})  # now alike: the same call succeeds (the group and the run are intact)
    scores = run.influence.compute_influence_all(q, distributed=True, progress=False)
    out["damping_scores"] = (alone.scores, alone.train_ids, scores.scores, scores.train_ids)
    torch.save(out, Path(tmp) / f"result_rank{rank}.pt")
