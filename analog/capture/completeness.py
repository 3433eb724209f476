"""What a ``with analog(...)`` block checks when it is left, so that nothing is dropped silently.

* **No gradient at all**: watched modules ran a forward pass whose output needed a gradient, but no
  gradient reached any of them inside the block (``backward()`` was not called, or was called after
  the block): a warning naming the ids that were therefore not logged.
* **Some modules without a gradient**: a module that ran but whose output did not reach the loss has a
  per-sample gradient of exactly zero; its ``grad`` log is filled with zeros so that every batch
  stores the same modules.
* **Watched modules that never ran**: a warning naming them (their weights may be used without
  calling the module, or the branch did not run); nothing is logged for them. Not for a module whose
  parameters all reached the logs through another module that ran (tied weights: T5's ``shared``
  embedding is called as ``encoder.embed_tokens``).
* **A mask that fits no module** (no watched module has positions): an error.
* **Broadcast inputs** (see analog.capture.broadcast): when every module that ran got a batch-1 input
  while ``data_id`` has more ids, or when the batch size read from the model's call differs from the
  batch the other modules saw: an error.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def check_complete(capture, ids: Optional[list]) -> None:
    _check_broadcast(capture)
    if capture._mask_given and capture.called and not capture._mask_used:
        raise ValueError(
            "a mask was given but no watched module has positions it could apply to (every module saw one "
            "position per example); leave mask out, or see analog.capture.masks for what it is for")
    called = [n for n in capture.modules if capture.calls[n]]
    got = [n for n in called if capture.grad_calls[n]]
    kinds = {"grad", "token_grad", "backward"} & set(capture.kinds)
    if kinds and called and not got:
        shown = "the batch" if ids is None else f"ids {list(ids)[:10]}{' …' if len(ids) > 10 else ''}"
        warnings.warn(
            f"this `with analog(...)` block ran a forward pass through {len(called)} watched modules but no gradient "
            f"reached them inside the block (call loss.backward() inside it): {shown} were not logged",
            stacklevel=4)
    elif got and "grad" in capture.kinds:
        _fill_zero_grads(capture, [n for n in called if n not in got])
    # one layout for every batch: logs in the watched modules' order (not the order gradients arrived)
    capture.logs = {n: capture.logs[n] for n in capture.modules if n in capture.logs}
    missing = [n for n in capture.modules if n not in capture.called and not _aliased(capture, n)]
    if missing and capture.called:
        warnings.warn(
            f"watched modules {missing[:10]}{' …' if len(missing) > 10 else ''} were not called in this block "
            "(a branch that did not run, or weights used without calling the module): nothing is logged for them",
            stacklevel=4)


def _aliased(capture, name) -> bool:
    """True when every parameter of ``name`` was used through another module that ran (tied weights)."""
    used = {id(p) for n in capture.called for p in capture.rules[n].covered_params(capture.modules[n]).values()}
    params = capture.rules[name].covered_params(capture.modules[name]).values()
    return bool(params) and all(id(p) in used for p in params)


def _check_broadcast(capture) -> None:
    if not capture.broadcast:
        return
    seen = {kinds["grad"].shape[0] for n, kinds in capture.logs.items()
            if n not in capture.broadcast and "grad" in kinds}
    expanded = set(capture.broadcast.values())
    if capture.batch_size is not None and not (capture.called - set(capture.broadcast)):
        raise ValueError(
            f"data_id has {capture.batch_size} ids but every watched module received a batch of 1 example; "
            "pass one id per example")
    if capture.batch_size is None and seen and seen != expanded:
        raise ValueError(
            f"modules {sorted(capture.broadcast)} were expanded to the batch size {sorted(expanded)} read from the "
            f"model's first argument, but other modules saw batches of {sorted(seen)}: pass data_id=... to state "
            "the batch size")


def _fill_zero_grads(capture, names) -> None:
    """Modules that ran but received no gradient: their per-sample gradient is exactly zero."""
    if not names:
        return
    some = next(k["grad"] for k in capture.logs.values() if "grad" in k)
    for name in names:
        module, rule = capture.modules[name], capture.rules[name]
        dims = (rule.groups(module), rule.out_dim(module), rule.in_dim(module))
        shape = capture.projector.grad_shape(name, dims)
        capture.logs.setdefault(name, {})["grad"] = torch.zeros(some.shape[0], *shape, device=some.device)
