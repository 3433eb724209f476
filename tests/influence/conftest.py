"""Shared pieces of the influence tests: a tiny model, data, logging through AnaLog, and
independent references (torch.func per-sample gradients, explicitly formed Fisher matrices)."""

import math

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


def run_logging(model, x, y, root, project, hessian, compression=None, batch=16, damping=None, storage=None,
                config=None):
    """Log per-sample gradients of (x, y) with AnaLog, finalize, and return the run in eval mode
    (``config``: further keys of the AnaLog config)."""
    run = AnaLog(project=project, config={"root_dir": str(root), "compression": compression or {"type": "none"},
                                          "storage": storage or {}, **(config or {})})
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


MLP_MODULES = ("0", "2")  # the Linear layers of make_mlp


def explicit_factors(model, x, y):
    """{module: (A, S)} float64 of a make_mlp model from the layer inputs and torch.func bias gradients:
    A = (1/N) Σ [x, 1][x, 1]ᵀ, S = (1/N) Σ δ δᵀ (δ = ∂ℓ/∂y = the per-sample bias gradient)."""
    grads = per_sample_grads(model, x, y)
    inputs = {"0": x, "2": torch.tanh(model[0](x)).detach()}
    out = {}
    for m in MLP_MODULES:
        a = torch.cat([inputs[m], torch.ones(len(x), 1)], 1).double()
        d = grads[f"{m}.bias"].double()
        out[m] = (a.T @ a / len(x), d.T @ d / len(x))
    return out


def split(a, s, lam=None):
    """(λ_A, λ_S): λ_A λ_S = λ, balanced by mean eigenvalues (traces / dimensions); λ = None: 0.1 × mean
    eigenvalue of S ⊗ A."""
    mean_a, mean_s = float(a.trace()) / len(a), float(s.trace()) / len(s)
    lam = 0.1 * mean_a * mean_s if lam is None else lam
    pi = math.sqrt(mean_a / mean_s)
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


def reference_scores(factors, gq, gt, lam=None):
    """{module: gq_m (S_λ ⊗ A_λ)⁻¹ gt_mᵀ} with the Kronecker matrix formed explicitly (row-major vec)."""
    out = {}
    for m, (a, s) in factors.items():
        lam_a, lam_s = split(a, s, lam)
        kron = torch.kron(s + lam_s * torch.eye(len(s), dtype=s.dtype), a + lam_a * torch.eye(len(a), dtype=a.dtype))
        out[m] = gq[m] @ torch.linalg.solve(kron, gt[m].T)
    return out


@pytest.fixture
def tiny():
    x, y = make_data()
    return make_mlp(), x, y
