"""Pieces shared by the trajectory tests: a tiny MLP, data, and independent references
(torch.func per-sample gradients at given parameters, explicit Fisher inverses)."""

from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

MODULES = ["0", "2"]


def make_data(n=24, d=5, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, k, (n,), generator=gen)


def make_mlp(d=5, h=6, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def module_grads(model, x, y, params=None):
    """{module: (B, d_out·(d_in+1))} per-sample gradients by torch.func, at ``params`` (default: the
    model's), in analog's [W | b] row-major layout, float64."""
    params = {k: v.detach() for k, v in (params or dict(model.named_parameters())).items()}

    def single(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)
    out = {}
    for m in MODULES:
        w, b = g[f"{m}.weight"], g[f"{m}.bias"]
        out[m] = torch.cat([w, b[..., None]], -1).reshape(len(x), -1).double()
    return out


def perturbed(model, scale, seed):
    """Parameters of ``model`` plus seeded noise: a stand-in for a checkpoint along training."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=gen) for k, v in model.named_parameters()}


# -- a 2-process run of the seed loop over 2 epochs (tests/trajectory/test_trajectory_distributed.py) ------
def epoch_loop(run, model, x, y, batches, epochs=2):
    """The seed loop over ``epochs`` passes of ``batches`` (lists of ids); between epochs every
    parameter moves by the same deterministic step on every rank (a stand-in for a synchronised update)."""
    for epoch in range(epochs):
        for ids in batches:
            with run(data_id=ids):
                loss_fn(model(x[ids]), y[ids]).backward()
            model.zero_grad()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.cos(torch.arange(p.numel(), dtype=p.dtype) + epoch).reshape(p.shape))


def segment_run(root, name):
    from analog import AnaLog
    from analog.trajectory.analysis import TrajectoryInfluence

    run = AnaLog(name, {"root_dir": str(root), "compression": {"type": "none"}, "hessian": "kfac",
                        "progress": False, "segments": {"checkpoint": True}})
    run.add_analysis({"trajectory": TrajectoryInfluence})
    return run


def worker_segments(rank, world, tmp, root):
    """Each rank logs its interleaved shard over 2 epochs; then TracIn-CP and segment-wise scores."""
    from analog.analysis.results import InfluenceScores  # noqa: F401  (import check in the child)

    model, (x, y), (xq, yq) = make_mlp(), make_data(), make_data(n=3, seed=7)
    run = segment_run(root, "ddp")
    run.watch(model)
    ids = list(range(rank, len(x), world))
    epoch_loop(run, model, x, y, [ids[i : i + 4] for i in range(0, len(ids), 4)])
    run.eval()
    model.eval()
    query_fn = lambda: loss_fn(model(xq), yq)  # noqa: E731
    tracin, wise = run.trajectory.tracin_cp(query_fn), run.trajectory.segment_wise(query_fn, damping=0.1)
    torch.save({"tracin": tracin.scores, "wise": wise.scores, "train_ids": tracin.train_ids,
                "run_id": run.segments.run, "segments": len(run.segments)}, Path(tmp) / f"result_rank{rank}.pt")
