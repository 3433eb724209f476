"""Workers for a `with analog(...)` block that fails on one rank only (a real 2-process gloo group).

Rank 1's block raises (its forward fails, or analog refuses the batch: a non-finite gradient, an id already
logged in the segment) and the exception propagates through the user's ``finally: run.finalize()``, while
rank 0 goes on to its next collective step (``finalize()``, or ``new_segment()`` at a segment boundary).
Every rank must raise the same RankError at once, naming rank 1 and its error, and the store must stay
resumable: ``worker_resume`` reopens it in a new group, logs what ``is_logged()`` says is missing and
finalizes. Passes run through the plain model (DDP's backward is a collective of its own: see the README).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from distributed_helpers import loss_fn, make_data, make_model, shard

CONFIG = {"log": ["grad"], "save": True, "hessian": "kfac", "progress": False, "damping": None,
          "storage": {"dtype": "float32"}, "compression": {"type": "logra", "rank": 2, "seed": 3},
          "segments": {"rule": "manual"}}
FAILING = 1  # the batch of rank 1 that fails (its shard's second: ids 9, 11, 13, 15)
#: scenario -> how rank 1's block fails, and the step rank 0 reaches next (at its batch SEGMENT_AT)
SCENARIOS = {"forward": "finalize()", "nonfinite": "finalize()", "repeated_id": "new_segment()"}
SEGMENT_AT = 2


def _chain(error):
    """'Type: message' of ``error`` and of the errors it was raised while handling, outermost first."""
    out = []
    while error is not None:
        out.append(f"{type(error).__name__}: {error}")
        error = error.__context__
    return out


def log_failing(run, model, rank, world, how):
    """Rank 0 logs its whole shard; rank 1 fails at its batch FAILING in the way ``how``. With a
    ``new_segment()`` step, every rank calls it before its batch SEGMENT_AT (rank 1 never gets there)."""
    x, y, _, _ = make_data()
    for b, ids in enumerate(shard(rank, world)):
        if SCENARIOS[how] == "new_segment()" and b == SEGMENT_AT:
            run.new_segment()
        fails = rank == 1 and b == FAILING
        data_id = shard(rank, world)[0] if fails and how == "repeated_id" else ids  # ids already logged
        with run(data_id=data_id):
            if fails and how == "forward":
                raise ValueError("injected: the forward failed on rank 1")
            loss = loss_fn(model(x[ids]), y[ids])
            (loss * float("nan") if fails and how == "nonfinite" else loss).backward()
        model.zero_grad()


def worker_block_fails(rank, world, tmp, root):
    from analog import AnaLog

    out = {}
    for how in SCENARIOS:
        model = make_model()
        run = AnaLog(how, {"root_dir": str(root), **CONFIG}).watch(model)
        start = time.monotonic()
        try:
            try:
                log_failing(run, model, rank, world, how)
            finally:  # the usual pattern: every rank finalizes, also when its loop raised
                run.finalize()
            out[how] = {"chain": []}
        except Exception as e:  # noqa: BLE001 - what each rank raised is the result
            out[how] = {"chain": _chain(e)}
        out[how]["seconds"] = time.monotonic() - start
        # a later collective call on the stopped run raises at once, with no collective
        start = time.monotonic()
        try:
            run.finalize()
        except Exception as e:  # noqa: BLE001
            out[how]["again"] = f"{type(e).__name__}: {e}"
        out[how]["again_seconds"] = time.monotonic() - start
    torch.save(out, Path(tmp) / f"result_rank{rank}.pt")


def worker_resume(rank, world, tmp, root, project):
    """Reopen ``project`` in a new group: log the batches the store lacks, finalize; what was skipped."""
    from analog import AnaLog

    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog(project, {"root_dir": str(root), **CONFIG}).watch(model)
    skipped = []
    for ids in shard(rank, world):
        if run.is_logged(ids):
            skipped.append(ids)
            continue
        with run(data_id=ids):
            loss_fn(model(x[ids]), y[ids]).backward()
        model.zero_grad()
    run.finalize()
    torch.save({"skipped": skipped, "n_samples": run.curvature.meta["n_samples"]},
               Path(tmp) / f"resume_rank{rank}.pt")


def single_process(root, project):
    """The reference: one process logging every example (the union of the ranks' shards), finalized."""
    from analog import AnaLog
    from analog.hessian import Curvature

    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog(project, {"root_dir": str(root), **CONFIG}).watch(model)
    for rank in range(2):
        for ids in shard(rank, 2):
            with run(data_id=ids):
                loss_fn(model(x[ids]), y[ids]).backward()
            model.zero_grad()
    run.finalize()
    return Curvature.load(run.curvature_path)


def worker_ddp_exit(rank, world, tmp, root):
    """The model's backward is DDP's (a collective of its own, which analog cannot reach): rank 1's forward
    fails and, as recommended, its error ends the process (nothing calls analog in a ``finally:``), so rank 0,
    waiting in DDP's gradient all-reduce, gets the backend's error at once (gloo: the peer closed)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from analog import AnaLog

    x, y, _, _ = make_data()
    model = make_model()
    ddp = DDP(model)
    run = AnaLog("ddp", {"root_dir": str(root), **CONFIG}).watch(ddp)
    start = time.monotonic()
    try:
        for b, ids in enumerate(shard(rank, world)):
            with run(data_id=ids):
                if rank == 1 and b == FAILING:
                    raise ValueError("injected: the forward failed on rank 1")
                loss_fn(ddp(x[ids]), y[ids]).backward()
            model.zero_grad()
        error = None
    except RuntimeError as e:  # rank 0: the backend's error; rank 1's ValueError ends its process (exit code 1)
        error = f"{type(e).__name__}: {e}"
    torch.save({"error": error, "seconds": time.monotonic() - start}, Path(tmp) / f"result_rank{rank}.pt")
