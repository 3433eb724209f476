"""Workers and single-process references for ranks that get no batch in a pass (a real 2-process gloo group).

Each scenario of ``SCENARIOS`` names a config and, per pass before scoring, the ids each rank logs
(``stats``: the statistics pass of a fitted LoGra init; ``log``: the logging pass). A rank given no ids
runs no ``with analog(...)`` block in that pass; it still calls ``next_pass()``/``finalize()`` (through
AnaLogScheduler), as every rank must. Passes run through the plain model: DDP's backward is a collective,
which a rank without a batch never enters. The reference is one process logging the union of both ranks'
ids, in batches of BATCH in id order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from distributed_helpers import BATCH, N, loss_fn, make_data, make_model, query

EVEN, ODD, ALL = list(range(0, N, 2)), list(range(1, N, 2)), list(range(N))
HALVES, RANK0, RANK1, NOBODY = (EVEN, ODD), (ALL, []), ([], ALL), ([], [])


def _config(hessian, save=True, init="random", rank=2):
    return {"log": ["grad"], "save": save, "hessian": hessian, "progress": False, "damping": None,
            "storage": {"dtype": "float32"},  # exact comparisons: not the int8 default
            "compression": {"type": "logra", "rank": rank, "init": init, "seed": 3}}


SCENARIOS = {  # name -> config, ids per rank in the statistics pass (fitted inits) and in the logging pass
    # rank 0, whose fit every rank takes (broadcast), saw no statistics itself
    "pca_stats_rank1": {"config": _config("kfac", init="pca"), "stats": RANK1, "log": HALVES},
    # rank 0 saw no statistics; in the logging pass rank 0 (which writes the state files) logs nothing
    "whiten_stats_rank0_log_rank1": {"config": _config("ekfac", init="whiten"), "stats": RANK0, "log": RANK1},
    "whiten_pca_log_rank0": {"config": _config("raw", init="whiten_pca"), "stats": HALVES, "log": RANK0},
    # logs not saved: the K-FAC sums are in memory, and rank 0's are zeros
    "kfac_memory_log_rank1": {"config": _config("kfac", save=False), "log": RANK1},
    # hessian auto: module "0" logs 8·6 = 48 numbers > 32 examples (K-FAC), module "2" 2·2 (raw from the store)
    "auto_log_rank1": {"config": _config("auto", rank={"0": [8, 6], "default": 2}), "log": RANK1},
    # one stored example: rank 1's share of the store is empty when scoring
    "diagonal_one_example": {"config": _config("diagonal"), "log": ([5], [])},
}
ERROR_SCENARIOS = ("stats_nobody", "finalize_in_stats_pass", "log_nobody")
#: two segments switched by an explicit new_segment() (rule "manual"): rank 0 logs nothing in the first,
#: rank 1 nothing in the second
SEGMENTS = (RANK1, RANK0)
SEGMENT_CONFIG = {**_config("kfac"), "segments": {"rule": "manual", "checkpoint": False}}


def union(split):
    return sorted(split[0] + split[1])


def batches(ids):
    return [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]


def log_passes(run, model, stats_ids, log_ids):
    """Every pass of AnaLogScheduler (it finalizes after the last); the phases it yielded."""
    from analog import AnaLogScheduler

    x, y, _, _ = make_data()
    phases = []
    for phase in AnaLogScheduler(run):
        phases.append(phase)
        for ids in batches(stats_ids if phase == "pca" else log_ids):
            with run(data_id=ids):
                loss_fn(model(x[ids]), y[ids]).backward()
            model.zero_grad()
    return phases


def outcome(run, model, phases, distributed):
    """What the tests compare: projections, curvature, and (saved logs) the scores of the scoring queries."""
    from analog.analysis import InfluenceFunction

    run.eval()
    out = {"phases": phases, "tensors": dict(run.projector.tensors), "state": dict(run.curvature.state),
           "n_samples": run.curvature.meta["n_samples"], "finalized": run.curvature.meta["finalized"]}
    if run.config.save:
        run.add_analysis({"influence": InfluenceFunction})
        q = query(run, model)
        out["scores"] = run.influence.compute_influence_all(q, distributed=distributed, progress=False)
        out["top"] = run.influence.compute_influence_all(q, topk=2, distributed=distributed, progress=False)
    return out


def log_segments(run, model, splits, lrs=(1.0, 0.5)):
    """Segment k logs the ids of ``splits[k]``; an explicit new_segment(lr) between them; then finalize()."""
    x, y, _, _ = make_data()
    for k, ids_k in enumerate(splits):
        if k:
            run.new_segment(lr=lrs[k])
        for ids in batches(ids_k):
            with run(data_id=ids):
                loss_fn(model(x[ids]), y[ids]).backward()
            model.zero_grad()
    run.finalize()


def single_process(root):
    """The reference of every scenario: one process, the union of the ranks' ids."""
    from analog import AnaLog

    out = {}
    for name, s in SCENARIOS.items():
        model = make_model().eval()
        run = AnaLog(name, {"root_dir": str(root), **s["config"]}).watch(model)
        phases = log_passes(run, model, union(s.get("stats", NOBODY)), union(s["log"]))
        out[name] = outcome(run, model, phases, distributed=False)
    model = make_model().eval()
    log_segments(AnaLog("segments", {"root_dir": str(root), **SEGMENT_CONFIG}).watch(model), model,
                 [union(split) for split in SEGMENTS])
    return out


def worker_empty_rank(rank, world, tmp, root):
    """Every scenario under the group, then the cases that must fail the same way on every rank."""
    from analog import AnaLog

    out, runs = {}, {}
    for name, s in SCENARIOS.items():
        model = make_model().eval()
        run = AnaLog(name, {"root_dir": str(root), **s["config"]}).watch(model)
        phases = log_passes(run, model, s.get("stats", NOBODY)[rank], s["log"][rank])
        out[name] = outcome(run, model, phases, distributed=True)
        out[name]["segment_modules"] = run.segments.current.modules
        runs[name] = run, model

    def attempt(key, fn):
        try:
            fn()
            out[key] = {"error": None}
        except RuntimeError as e:
            out[key] = {"error": f"{type(e).__name__}: {e}"}

    model = make_model().eval()
    cfg = {"root_dir": str(root), **_config("kfac", init="pca")}
    # no rank has a statistics block
    attempt("stats_nobody", lambda: log_passes(AnaLog("stats_nobody", cfg).watch(model), model, [], ALL))

    def finalize_in_stats_pass():  # rank 0 ran statistics blocks, rank 1 none; finalize() without next_pass()
        run = AnaLog("finalize_in_stats_pass", cfg).watch(model)
        x, y, _, _ = make_data()
        for ids in batches(RANK0[rank]):
            with run(data_id=ids):
                loss_fn(model(x[ids]), y[ids]).backward()
            model.zero_grad()
        run.finalize()

    attempt("finalize_in_stats_pass", finalize_in_stats_pass)

    def log_nobody():  # nothing logged anywhere: finalize fits nothing, as in one process
        run = AnaLog("log_nobody", {"root_dir": str(root), **_config("kfac", save=False)}).watch(model)
        log_passes(run, model, [], [])
        out["log_nobody_state"] = {"finalized": run.curvature.meta["finalized"],
                                   "n_samples": run.curvature.meta["n_samples"]}

    attempt("log_nobody", log_nobody)
    log_segments(AnaLog("segments", {"root_dir": str(root), **SEGMENT_CONFIG}).watch(model), model,
                 [split[rank] for split in SEGMENTS])

    checkpointed = {"root_dir": str(root), **SEGMENT_CONFIG, "segments": {"rule": "manual", "checkpoint": True}}
    # rank 0, which writes the checkpoints before its own first batch of a segment, logs none of this one
    attempt("no_checkpoint", lambda: log_segments(AnaLog("no_checkpoint", checkpointed).watch(model), model,
                                                  [RANK1[rank]]))
    # its logs are on disk: the project reopened without checkpoints fits them
    reopened = AnaLog("no_checkpoint", {**checkpointed, "segments": {"rule": "manual", "checkpoint": False}})
    reopened.watch(model).finalize()
    out["no_checkpoint_refit"] = reopened.curvature.meta["n_samples"]
    out["rank_fails"] = rank_fails(rank, runs)
    torch.save(out, Path(tmp) / f"empty_rank{rank}.pt")


def rank_fails(rank, runs):
    """Rank 0 alone fails (an injected out-of-memory error) in its share of a store fit (rank 1 reads no
    batch of the 32-row store) and of sharded scoring: every rank must raise, not wait for it."""
    from analog.analysis.influence import InfluenceFunction
    from analog.distributed import RankError
    from analog.hessian.simple import Diagonal

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("injected on rank 0")

    out = {}
    for key, cls, method, call in [
        ("refit", Diagonal, "_accumulate", lambda: runs["diagonal_one_example"][0].refit()),
        ("scores", InfluenceFunction, "_pairwise",
         lambda: runs["pca_stats_rank1"][0].influence.compute_influence_all(query(*runs["pca_stats_rank1"]),
                                                                             distributed=True, progress=False)),
    ]:
        original = getattr(cls, method)
        if rank == 0:
            setattr(cls, method, fail)
        try:
            call()
            out[key] = None
        except RankError as e:
            out[key] = str(e)
        finally:
            setattr(cls, method, original)
        out[f"{key}_after"] = call()  # the group is intact: the same call succeeds on every rank now
    return out
