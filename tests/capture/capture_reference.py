"""Independent per-sample gradient references for the capture tests, and analog's side of the comparison.

References (none of them uses analog code):

* ``func_per_sample``: ``torch.func.vmap(grad(loss))`` over ``functional_call`` — every example is run
  alone as a batch of one inside vmap, so it is the exact per-example gradient of the user's loss;
* ``loop_per_sample``: plain autograd, one example at a time (batch size 1), ``param.grad`` read back.

``analog_per_sample`` logs uncompressed per-sample gradients (compression ``none``) with the facade and
maps them back to parameter shapes with each rule's ``param_grads``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

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
    _, logs = analog.get_log()
    grads = {}
    for name, kinds in logs.items():
        module = analog.modules[name]
        for pname, g in analog.rules[name].param_grads(module, kinds["grad"]).items():
            grads[f"{name}.{pname}" if name else pname] = g
    return grads


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
