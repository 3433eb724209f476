"""Pieces shared by the trajectory tests: a tiny MLP, data, and independent references
(torch.func per-sample gradients at given parameters, explicit Fisher inverses)."""

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
