"""Worker for the start of a checkpointed segment under a real 2-process gloo group, where rank 1's first
chunk reaches the store before rank 0's first batch (a slower rank 0): rank 0 must still take the segment's
checkpoint, the watched parameters before any of its logs."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from distributed_helpers import loss_fn, make_data, make_model, shard

CONFIG = {"log": ["grad"], "save": True, "hessian": "kfac", "progress": False, "damping": None,
          "storage": {"dtype": "float32"}, "compression": {"type": "logra", "rank": 2, "seed": 3},
          "segments": {"rule": "manual", "checkpoint": True}}


def worker_late_rank0(rank, world, tmp, root):
    import analog.segmenting as segmenting
    from analog import AnaLog

    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog("late", {"root_dir": str(root), **CONFIG}).watch(model)
    flushed = Path(tmp) / "rank1_flushed"
    if rank == 0:  # rank 0 is slow: between its first block's rank check and the segment step, rank 1's
        inner = segmenting.segment_step  # first batch reaches the store

        def late(run_, ids_):
            deadline = time.monotonic() + 30
            while not flushed.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return inner(run_, ids_)

        segmenting.segment_step = late
    for b, ids in enumerate(shard(rank, world)):
        with run(data_id=ids):
            loss_fn(model(x[ids]), y[ids]).backward()
        model.zero_grad()
        if rank == 1 and b == 0:
            run.flush()
            flushed.touch()
    run.finalize()
    torch.save({"checkpoint": run.segments.current.checkpoint}, Path(tmp) / f"result_rank{rank}.pt")
