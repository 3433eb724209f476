"""Workers and the single-process reference for LoGra ``init="query"`` on a real 2-process gloo group.

Every run makes the three passes of AnaLogScheduler ("pca" and "log" over the training data, "query"
over a query sample) with ``hessian: raw`` and scores the scoring queries of distributed_helpers. Under
the group each rank sees its interleaved half of the training data (``shard``) and the query-sample
positions ``QUERY_SPLITS[split][rank]``. Training passes run through a DDP wrapper; the query pass runs
through the plain model, because DDP's backward is a collective and a rank may hold no queries.
"""

from __future__ import annotations

from pathlib import Path

import torch
from distributed_helpers import BATCH, N, loss_fn, make_data, make_model, query, shard

N_SAMPLE = 6  # the query sample of the query pass (other inputs than the scoring queries)
RANK = 2  # LoGra rank per side: (d_out, d_in) = (8, 7) and (3, 9), so every side is fitted
QUERY_SPLITS = {  # split -> the query-sample positions of rank 0 and rank 1
    "halves": ([0, 2, 4], [1, 3, 5]),
    "rank0_all": (list(range(N_SAMPLE)), []),  # rank 1 adds zero Grams
    "rank1_all": ([], list(range(N_SAMPLE))),  # rank 0, whose fit every rank takes, saw none itself
    "none": ([], []),
}


def query_sample():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(N_SAMPLE, 6, generator=gen), torch.randint(0, 3, (N_SAMPLE,), generator=gen)


def config(root):
    return {"root_dir": str(root), "log": ["grad"], "save": True, "hessian": "raw", "progress": False,
            "storage": {"dtype": "float32"},  # exact comparisons: not the int8 default
            "compression": {"type": "logra", "rank": RANK, "init": "query"}}


def query_project(model, batches, positions, root, name, net=None):
    """The three passes: training ``batches`` of ids through ``net`` (default ``model``), the query
    sample's ``positions`` through ``model`` in blocks of two; returns the run and the phases seen."""
    from analog import AnaLog, AnaLogScheduler

    x, y, _, _ = make_data()
    xs, ys = query_sample()
    net = net if net is not None else model
    run = AnaLog(name, config(root)).watch(model)
    phases = []
    for phase in AnaLogScheduler(run):
        phases.append(phase)
        if phase == "query":
            for i in range(0, len(positions), 2):
                pos = positions[i : i + 2]
                with run():
                    loss_fn(model(xs[pos]), ys[pos]).backward()
                model.zero_grad()
            continue
        for ids in batches:
            with run(data_id=ids):
                loss_fn(net(x[ids]), y[ids]).backward()
            model.zero_grad()
    return run, phases


def score(run, model, distributed=False):
    from analog.analysis import InfluenceFunction

    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run.influence.compute_influence_all(query(run, model), distributed=distributed, progress=False)


def single_process(root):
    """The reference: one process, all training data (batches of BATCH ids) and the whole query sample."""
    model = make_model().eval()  # no dropout here; silences the analysis-mode warning
    batches = [list(range(i, i + BATCH)) for i in range(0, N, BATCH)]
    run, phases = query_project(model, batches, list(range(N_SAMPLE)), root, "single")
    return {"phases": phases, "tensors": dict(run.projector.tensors), "scores": score(run, model)}


def worker_query(rank, world, tmp, root, splits):
    """For each split: the three passes under the group, then sharded scoring; or the error raised."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for split in splits:
        model = make_model().eval()  # no dropout here; silences the analysis-mode warning
        try:
            run, phases = query_project(model, shard(rank, world), QUERY_SPLITS[split][rank], root, split,
                                        net=DDP(model))
        except RuntimeError as e:
            out[split] = {"error": str(e)}
            continue
        out[split] = {"phases": phases, "tensors": dict(run.projector.tensors),
                      "scores": score(run, model, distributed=True)}
    torch.save(out, Path(tmp) / f"query_rank{rank}.pt")


def worker_reduce_twice(rank, world, tmp, root):
    """The statistics pass and a query pass split 3/3 over the ranks, then the query Grams read twice (as a
    fit retried after an error reads them): both reads must be the same sums over the ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from analog import AnaLog

    model = make_model().eval()
    x, y, _, _ = make_data()
    xs, ys = query_sample()
    run = AnaLog("retry", config(root)).watch(model)
    net = DDP(model)
    for ids in shard(rank, world):
        with run(data_id=ids):
            loss_fn(net(x[ids]), y[ids]).backward()
        model.zero_grad()
    run.next_pass()  # -> the query pass
    pos = QUERY_SPLITS["halves"][rank]
    with run():
        loss_fn(model(xs[pos]), ys[pos]).backward()
    model.zero_grad()
    first, second = run._pass_stats.reduced(), run._pass_stats.reduced()
    torch.save({"first": first, "second": second}, Path(tmp) / f"reduce_rank{rank}.pt")
