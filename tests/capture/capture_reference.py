"""Independent per-sample gradient references for the capture tests, and analog's side of the comparison.

References (none of them uses analog code):

* ``func_per_sample``: ``torch.func.vmap(grad(loss))`` over ``functional_call`` — every example is run
  alone as a batch of one inside vmap, so it is the exact per-example gradient of the user's loss;
* ``loop_per_sample``: plain autograd, one example at a time (batch size 1), ``param.grad`` read back;
* ``gated_token_grads``: the per-token shares of modules by plain autograd, each module's parameters reaching
  the loss through one (example, token) of its output at a time.

``analog_per_sample`` (``analog_per_token``) logs uncompressed per-sample (per-token) gradients (compression
``none``) with the facade and maps them back to parameter shapes with each rule's ``param_grads``.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from analog import AnaLog

ATOL, RTOL = 1e-5, 1e-4  # float32 tolerances (values are O(1), sums over a few hundred terms)

# loss_fn(outputs, *targets) -> scalar summed over the (single-example) batch
LossFn = Callable[..., torch.Tensor]


def func_per_sample(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor] = (),
    names: Optional[Sequence[str]] = None,
    tie_weights: bool = True,
) -> Dict[str, torch.Tensor]:
    """{param name: (B, *param.shape)} by ``vmap(grad(...))``; ``tie_weights=False`` separates tied uses."""
    params = dict(model.named_parameters(remove_duplicate=tie_weights))
    if names is not None:
        params = {k: v for k, v in params.items() if k in set(names)}
    frozen = {k: v.detach() for k, v in model.named_parameters(remove_duplicate=tie_weights) if k not in params}
    buffers = dict(model.named_buffers())

    def loss(p, xs, ys):
        xs = tuple(x.unsqueeze(0) for x in xs)
        ys = tuple(y.unsqueeze(0) for y in ys)
        out = functional_call(model, {**frozen, **p, **buffers}, xs, tie_weights=tie_weights)
        return loss_fn(out, *ys)

    detached = {k: v.detach() for k, v in params.items()}
    return vmap(grad(loss), in_dims=(None, 0, 0))(detached, tuple(inputs), tuple(targets))


def loop_per_sample(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor] = (),
) -> Dict[str, torch.Tensor]:
    """{param name: (B, *param.shape)} by autograd on one example at a time."""
    params = dict(model.named_parameters())
    out: Dict[str, list] = {k: [] for k in params}
    for i in range(inputs[0].shape[0]):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*(x[i : i + 1] for x in inputs)), *(y[i : i + 1] for y in targets))
        loss.backward()
        for k, p in params.items():
            out[k].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def make_analog(tmp_path, project: str = "capture", **config) -> AnaLog:
    cfg = {"root_dir": str(tmp_path), "save": False, "hessian": "none", "compression": {"type": "none"}}
    cfg.update(config)
    return AnaLog(project=project, config=cfg)


def analog_per_sample(
    analog: AnaLog,
    step: Callable[[], torch.Tensor],
    batch_size: int,
    mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Run ``step()`` (returns the loss) inside ``with analog(...)``, backprop, map logs to parameters."""
    with analog(data_id=list(range(batch_size)), mask=mask):
        step().backward()
    return logged_params(analog, "grad")


def analog_per_token(
    analog: AnaLog,
    step: Callable[[], torch.Tensor],
    batch_size: int,
    mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """As ``analog_per_sample`` inside ``analog(per_token=True)`` (analysis mode): {param name: (B, T, *shape)}."""
    with analog(data_id=list(range(batch_size)), mask=mask, per_token=True):
        step().backward()
    return logged_params(analog, "token_grad")


def logged_params(analog: AnaLog, kind: str) -> Dict[str, torch.Tensor]:
    """The last block's ``kind`` logs ("grad" (B, *G) or "token_grad" (B, T, *G)) mapped to parameter shapes."""
    _, logs = analog.get_log()
    grads = {}
    for name, kinds in logs.items():
        module, g = analog.modules[name], kinds[kind]
        lead = g.shape[: g.dim() - 3]  # (B,) or (B, T) in front of (groups, d_out, d_in)
        for pname, p in analog.rules[name].param_grads(module, g.reshape(-1, *g.shape[-3:])).items():
            grads[f"{name}.{pname}" if name else pname] = p.reshape(*lead, *p.shape[1:])
    return grads


def gated_token_grads(
    model: nn.Module,
    modules: Dict[str, Tuple[nn.Module, int]],
    loss_fn: Callable[[], torch.Tensor],
    shape: Sequence[int],
) -> Dict[str, torch.Tensor]:
    """{"module.param": (B, T, *param.shape)}: the share of token t of example b in ∂L/∂θ of each module.

    ``modules``: {name: (module, the axis of the tokens in its output)}; ``shape`` = (B, T). For each (b, t),
    every module's forward hook hands the model

        y' = f(x, θ̄) + g ⊙ (f(x̄, θ) − f(x̄, θ̄))          (z̄: z detached; g: 1 at example b, token t, else 0)

    computed with ``functional_call``. y' equals y, so the loss ``loss_fn()`` is unchanged and ∂L/∂x is the
    model's own at every position (the first term), while ∂L/∂θ flows only through y_{b,t}: it is
    Σ_{p ∈ (b, t)} (∂L/∂y_p) ∂y_p/∂θ, the gradient of a copy of θ used at that token alone. B·T backward
    passes; parameters tied across modules would add up their uses in ``param.grad`` (untie them).
    """
    params = {name: dict(m.named_parameters(recurse=False)) for name, (m, _) in modules.items()}
    out = {f"{name}.{k}": torch.zeros(*shape, *p.shape) for name, ps in params.items() for k, p in ps.items()}
    busy = [False]  # functional_call runs the module's hooks again: those calls pass through unchanged

    def gate(name, axis, b, t, module, args, kwargs, y):
        if busy[0]:
            return None
        busy[0] = True
        try:
            frozen = {k: p.detach() for k, p in params[name].items()}
            detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            through_x = functional_call(module, frozen, args, kwargs)
            through_theta = functional_call(module, params[name], detached, kwargs)
        finally:
            busy[0] = False
        g = torch.zeros(y.shape[0], y.shape[axis], dtype=y.dtype)
        g[b, t] = 1
        g = g.reshape(y.shape[0], *[1] * (axis - 1), y.shape[axis], *[1] * (y.dim() - axis - 1))
        return through_x + g * (through_theta - through_theta.detach())

    for b in range(shape[0]):
        for t in range(shape[1]):
            handles = [m.register_forward_hook(functools.partial(gate, name, axis, b, t), with_kwargs=True)
                       for name, (m, axis) in modules.items()]
            try:
                model.zero_grad(set_to_none=True)
                loss_fn().backward()
            finally:
                for handle in handles:
                    handle.remove()
            for name, ps in params.items():
                for k, p in ps.items():
                    if p.grad is not None:
                        out[f"{name}.{k}"][b, t] = p.grad
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_match(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], atol=ATOL, rtol=RTOL) -> int:
    """Assert every logged parameter gradient equals the reference; returns how many were compared."""
    missing = sorted(set(got) - set(ref))
    assert not missing, f"no reference for {missing}"
    for key, value in got.items():
        expected = ref[key]
        assert value.shape == expected.shape, f"{key}: shape {tuple(value.shape)} != {tuple(expected.shape)}"
        err = (value - expected).abs().max().item()
        scale = expected.abs().max().item()
        assert torch.allclose(value, expected, atol=atol * max(1.0, scale), rtol=rtol), \
            f"{key}: max abs error {err:.3g} (reference max {scale:.3g})"
    assert len(got) > 0
    return len(got)


def sum_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A per-example loss summed over the batch (``reduction='sum'``), any output shape."""
    return ((out - target) ** 2).sum()


def tied_sums(model: nn.Module, got: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-use gradients of tied parameters summed under the parameter's first name (as autograd sums them)."""
    canonical = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    by_name = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    out: Dict[str, torch.Tensor] = {}
    for key, g in got.items():
        target = by_name[key]
        out[target] = g if target not in out else out[target] + g
    return out
