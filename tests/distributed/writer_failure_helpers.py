"""Worker for a log writer that fails on one rank only at finalize() (a real 2-process gloo group): e.g.
its last chunk cannot be written. Every rank must raise, naming the rank and its error, instead of its peers
waiting for it at the barrier that follows until the group's timeout."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from distributed_helpers import loss_fn, make_data, make_model, shard

CONFIG = {"log": ["grad"], "save": True, "hessian": "kfac", "progress": False, "damping": None,
          "storage": {"dtype": "float32"}, "compression": {"type": "logra", "rank": 2, "seed": 3}}


def worker_writer_fails(rank, world, tmp, root):
    from analog import AnaLog
    from analog.storage import LogWriter

    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog("fails", {"root_dir": str(root), **CONFIG}).watch(model)
    for ids in shard(rank, world):
        with run(data_id=ids):
            loss_fn(model(x[ids]), y[ids]).backward()
        model.zero_grad()
    if rank == 1:
        original = LogWriter.close

        def close(self):
            original(self)
            raise OSError("injected: no space left for the last chunk")

        LogWriter.close = close
    start = time.monotonic()
    try:
        run.finalize()
        error = None
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        error = f"{type(e).__name__}: {e}"
    torch.save({"error": error, "seconds": time.monotonic() - start}, Path(tmp) / f"result_rank{rank}.pt")
