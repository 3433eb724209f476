"""Shared pieces of the influence tests: a tiny model, data, logging through AnaLog, and
independent references (torch.func per-sample gradients, explicitly formed Fisher matrices)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from analog import AnaLog
from analog.analysis import InfluenceFunction


def make_data(n=48, d=6, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, k, (n,), generator=gen)


def make_mlp(d=6, h=8, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def run_logging(model, x, y, root, project, hessian, compression=None, batch=16, damping=None, storage=None):
    """Log per-sample gradients of (x, y) with AnaLog, finalize, and return the run in eval mode."""
    run = AnaLog(project=project, config={"root_dir": str(root), "compression": compression or {"type": "none"},
                                          "storage": storage or {}})
    run.update({"log": ["grad"], "hessian": hessian, "save": True, "damping": damping})
    run.watch(model)
    for i in range(0, len(x), batch):
        with run(data_id=list(range(i, min(i + batch, len(x))))):
            loss_fn(model(x[i : i + batch]), y[i : i + batch]).backward()
        model.zero_grad()
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run


def query_log(run, model, x, y):
    with run():
        loss_fn(model(x), y).backward()
    model.zero_grad()
    return run.get_log()


def per_sample_grads(model, x, y):
    """{param name: (B, *shape)} by torch.func, independent of analog's hooks."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)


def flat_module_grads(grads, module, with_bias=True):
    """(B, d_out·(d_in+1)) per-sample gradient of a Linear module in analog's [W | b] row-major layout."""
    w = grads[f"{module}.weight"]
    cols = [w, grads[f"{module}.bias"][..., None]] if with_bias else [w]
    return torch.cat(cols, -1).reshape(w.shape[0], -1).double()


@pytest.fixture
def tiny():
    x, y = make_data()
    return make_mlp(), x, y
