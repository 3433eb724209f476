"""Start real torch.distributed process groups (gloo, CPU) for the tests, and the workers they run.

``run_group(worker, tmp_path, **kwargs)`` starts ``world`` processes with the spawn context; each
joins a gloo group through a FileStore in ``tmp_path`` (collectives time out after ``pg_timeout``
seconds, so a disagreement can never hang), runs ``worker(rank, world, tmp_path, **kwargs)`` and
leaves a traceback file if it raised. The parent joins with a deadline and kills what is left, so a
stuck child cannot hang the suite.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

N, D, H, K = 32, 6, 8, 3  # examples, input, hidden, classes
BATCH = 4  # per-rank batch
N_QUERY = 5


# -- model and data shared by the workers and the single-process references --------------------------
def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, K))


def make_data():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D, generator=gen), torch.randint(0, K, (N,), generator=gen)
    xq, yq = torch.randn(N_QUERY, D, generator=gen), torch.randint(0, K, (N_QUERY,), generator=gen)
    return x, y, xq, yq


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def shard(rank, world):
    """Rank ``rank``'s batches of example ids: a disjoint, interleaved share (as a DistributedSampler)."""
    ids = list(range(rank, N, world))
    return [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]


PROJECTS = {  # name -> config (each run once by the 2-process group and once in one process)
    "kfac": {"hessian": "kfac", "compression": {"type": "logra", "rank": 4, "seed": 3}},
    "ekfac": {"hessian": "ekfac", "compression": {"type": "logra", "rank": 4, "seed": 3}},
    "raw_pca": {"hessian": "raw", "compression": {"type": "logra", "rank": 3, "init": "pca"}},
    # k = 9 per module, 8k² = 648 bytes of sums: one read of the store per module, each reduced over ranks
    "raw_groups": {"hessian": "raw", "compression": {"type": "logra", "rank": 3, "seed": 3}, "fit_bytes": 648},
}


def log_project(model, batches, root, name, ddp=None, watch_wrapped=False):
    """Log ``batches`` of ids with AnaLog under PROJECTS[name]; return the run in eval mode.

    ``ddp``: the DistributedDataParallel wrapper to run forward/backward through; the run watches
    the wrapper when ``watch_wrapped`` (else the plain model, watched before wrapping)."""
    from analog import AnaLog
    from analog.analysis import InfluenceFunction

    x, y, _, _ = make_data()
    run = AnaLog(project=name, config={"root_dir": str(root), "log": ["grad"], "save": True, "damping": None,
                                       **PROJECTS[name]})
    run.watch(ddp if (ddp is not None and watch_wrapped) else model)
    net = ddp if ddp is not None else model
    passes = 2 if PROJECTS[name]["compression"].get("init") == "pca" else 1
    for p in range(passes):
        for ids in batches:
            with run(data_id=ids):
                loss_fn(net(x[ids]), y[ids]).backward()
            model.zero_grad()
        if p == 0 and passes == 2:
            run.next_pass()
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run


def query(run, model):
    _, _, xq, yq = make_data()
    with run(data_id=[f"q{i}" for i in range(N_QUERY)]):
        loss_fn(model(xq), yq).backward()
    model.zero_grad()
    return run.get_log()


# -- process groups -------------------------------------------------------------------------------------
def _entry(worker, rank, world, tmp, pg_timeout, kwargs):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg_init", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout))
        worker(rank, world, Path(tmp), **kwargs)
        dist.destroy_process_group()
    except BaseException:
        (Path(tmp) / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    # The worker's results are on disk and the group is destroyed: leave without the interpreter's teardown.
    # A rank once died with SIGABRT ("terminate called without an active exception", exit -6, no Python
    # error) in one of ~8 runs of test_distributed_query; a C++ thread destroyed while joinable at exit is
    # the usual cause of that message. If it recurs, `errors()` says which ranks' result files exist.
    os._exit(0)


def run_group(worker, tmp_path, world=2, timeout=90.0, pg_timeout=20.0, **kwargs):
    """Run ``worker`` on ``world`` spawned processes; return their exit codes (a stuck one is killed: -9)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(worker, r, world, str(tmp_path), pg_timeout, kwargs), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [p.exitcode for p in procs]


def errors(tmp_path):
    """The ranks' tracebacks, and which files the ranks left (a rank killed by a signal writes no traceback)."""
    files = sorted(p.name for p in Path(tmp_path).iterdir() if p.is_file())
    return "\n".join([f.read_text() for f in sorted(Path(tmp_path).glob("error_rank*.txt"))] + [f"files: {files}"])


# -- workers --------------------------------------------------------------------------------------------
def worker_equivalence(rank, world, tmp, root):
    """Every project through a DDP-wrapped model; influence scored sharded (full and top-k)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import analog.hessian.base as base

    reads, inner = [], base.store_batches  # the modules of each read of the store (None: every module)

    def counted(*args, modules=None, **kwargs):
        reads.append(None if modules is None else list(modules))
        return inner(*args, modules=modules, **kwargs)

    base.store_batches = counted
    out = {}
    for i, name in enumerate(PROJECTS):
        reads.clear()
        model = make_model()
        watch_wrapped = i % 2 == 1  # before wrapping (kfac, raw_pca), on the wrapper (ekfac, raw_groups)
        ddp = DDP(model)
        run = log_project(model, shard(rank, world), root, name, ddp=ddp, watch_wrapped=watch_wrapped)
        q = query(run, model)
        full = run.influence.compute_influence_all(q, distributed=True, progress=False)
        top = run.influence.compute_influence_all(q, topk=5, distributed=True, progress=False)
        # the same store scored by this rank alone: the sharded result must equal it
        local = run.influence.compute_influence_all(q, progress=False)
        small = run.influence.compute_influence_all(q, run.build_log_dataloader(batch_size=3), topk=4,
                                                    distributed=True, progress=False)
        out[name] = {"modules": sorted(run.modules), "fingerprint": run.projector.fingerprint(),
                     "state": dict(run.curvature.state), "n_samples": run.curvature.meta["n_samples"],
                     "full": full, "top": top, "local": local, "small_top": small, "reads": list(reads)}
    torch.save(out, Path(tmp) / f"result_rank{rank}.pt")


def worker_disagree(rank, world, tmp, root):
    """Ranks that disagree on the module set, the compression config or the projection: errors everywhere."""
    from analog import AnaLog

    x, y, _, _ = make_data()
    messages = {}

    def attempt(key, fn):
        try:
            fn()
            messages[key] = None
        except RuntimeError as e:
            messages[key] = str(e)

    model = make_model()
    cfg = {"root_dir": str(root), "hessian": "kfac", "compression": {"type": "logra", "rank": 2}}
    attempt("modules", lambda: AnaLog("modules", cfg).watch(model, name_filter=["0", "2"] if rank == 0 else ["0"]))
    seeded = {**cfg, "compression": {"type": "logra", "rank": 2, "seed": rank}}
    attempt("seed", lambda: AnaLog("seed", seeded).watch(model))
    # ranks naming different projects (e.g. a name built from the rank or a time stamp)
    attempt("project", lambda: AnaLog(f"named_by_rank{rank}", cfg).watch(model))

    run = AnaLog("projection", cfg).watch(model)
    if rank == 1:  # a projection changed behind analog's back on one rank only
        run.projector.load_tensors({k: v * 2 for k, v in run.projector.tensors.items()})

    def log_once():
        with run(data_id=[rank]):
            loss_fn(model(x[[rank]]), y[[rank]]).backward()

    attempt("projection", log_once)
    torch.save(messages, Path(tmp) / f"messages_rank{rank}.pt")


def worker_dies(rank, world, tmp, root):
    """Rank 1 flushes two batches, then dies (os._exit); rank 0 logs all of its shard and finalizes."""
    from analog import AnaLog

    x, y, _, _ = make_data()
    model = make_model()
    run = AnaLog("dies", {"root_dir": str(root), "hessian": "kfac", "compression": {"type": "logra", "rank": 2},
                          "storage": {"flush_bytes": 1}})
    run.watch(model)
    for b, ids in enumerate(shard(rank, world)):
        if rank == 1 and b == 2:
            run.flush()  # what rank 1 logged so far is on disk
            os._exit(3)
        with run(data_id=ids):
            loss_fn(model(x[ids]), y[ids]).backward()
        model.zero_grad()
    try:
        run.finalize()  # collective: fails (peer gone) after the writer closed
        outcome = "finalized"
    except Exception as e:  # noqa: BLE001 - any error of the broken group is expected
        outcome = f"error: {type(e).__name__}: {e}"
    (Path(tmp) / "rank0_outcome.txt").write_text(outcome)
    os._exit(0)  # skip destroy_process_group on a broken group
