"""Worker for ranks given different ``fit_bytes`` (a real 2-process gloo group): e.g. each rank sets its
budget from its own free memory. Each rank logs its shard of the examples into one raw-curvature project."""

from __future__ import annotations

from pathlib import Path

import torch
from distributed_helpers import loss_fn, make_data, make_model, shard

#: LoGra rank 3 a side: k = 9 per module, 8k² = 648 bytes of float64 sums each
CONFIG = {"log": ["grad"], "save": True, "hessian": "raw", "progress": False, "damping": None,
          "storage": {"dtype": "float32"}, "compression": {"type": "logra", "rank": 3, "seed": 3}}
#: rank 0: one module per read of the store; rank 1: both modules in one read
BUDGETS = (648, 2**30)


def worker_uneven_fit_bytes(rank, world, tmp, root):
    from analog import AnaLog

    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog("uneven", {"root_dir": str(root), **CONFIG, "fit_bytes": BUDGETS[rank]})
    run.watch(model)
    for ids in shard(rank, world):
        with run(data_id=ids):
            loss_fn(model(x[ids]), y[ids]).backward()
        model.zero_grad()
    run.finalize()
    torch.save({"state": dict(run.curvature.state), "n": run.curvature.meta["n_samples"]},
               Path(tmp) / f"result_rank{rank}.pt")
