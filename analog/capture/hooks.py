"""The hooks of one ``with analog(...)`` block.

``Capture`` registers a forward hook on every watched module when the block is entered and
removes every handle when it is left (also on an exception), so passes outside the block change
nothing; tensor hooks already placed on outputs are disarmed too, so a backward run after the
block through a graph built inside it leaves the logs as they were.

For each forward call whose output needs a gradient, the forward hook keeps the (projected)
activations ã and registers a hook on that call's output tensor; when the gradient arrives, the
backward side forms δ̃ and the per-sample gradient Σ_t δ̃_t ã_tᵀ of that call, passed through
the projector's ``compress_grad`` (the dense projection; the identity for LoGra).
A module called several times in one step (weight sharing) adds up its calls, as autograd does.
Under gradient checkpointing the recomputed forward registers hooks on outputs that receive no
gradient, so nothing is counted twice.

All captured values are float32 (autocast inputs are upcast before projection).

``torch.compile``: Dynamo by default does not guard compiled code on module hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so a model compiled and run *before* the
block would keep running its hook-free graph inside it and log nothing, silently. Entering a
block therefore turns those guards on; if Dynamo was already in use with them off, its caches are
reset once (a one-time recompile) so every compiled graph from then on sees analog's hooks.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from analog.capture.rules import LayerRule

#: observer(name, a, d, mask) is called with each call's factors (B, T, G, r_in), (B, T, G, r_out)
FactorObserver = Callable[[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


class Capture:
    """Per-batch capture of ``kinds`` ⊆ {"grad", "token_grad", "forward", "backward"} from watched modules.

    ``token_grad`` keeps one gradient per position (for per-token influence of queries).
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        rules: Dict[str, LayerRule],
        projector,
        kinds: Sequence[str],
        batch_size: Optional[int] = None,
        mask: Optional[torch.Tensor] = None,
        observer: Optional[FactorObserver] = None,
    ):
        self.modules, self.rules, self.projector = modules, rules, projector
        self.kinds = tuple(kinds)
        self.batch_size, self.mask, self.observer = batch_size, mask, observer
        self.needs_backward = bool({"grad", "token_grad", "backward"} & set(self.kinds)) or observer is not None
        self.logs: Dict[str, Dict[str, torch.Tensor]] = {}
        self._handles = []
        self._open = False

    def __enter__(self) -> "Capture":
        guard_compiled_hooks()
        self._open = True
        try:
            for name, module in self.modules.items():
                hook = self._make_forward_hook(name)
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the module hooks and disarm the tensor hooks already placed on outputs."""
        self._open = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks ------------------------------------------------------------------------------
    def _make_forward_hook(self, name: str):
        def hook(module, inputs, output):
            self._forward(name, module, inputs, output)

        return hook

    def _forward(self, name, module, inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"module {name!r} returned {type(output).__name__}; analog expects a tensor")
        # projections run in float32 even inside the user's autocast region
        with torch.no_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            x = inputs[0].detach()
            self._check_batch(name, x.shape[0])
            a = self.projector.project_activations(name, module, self.rules[name], _float(x))
            a = self._masked(name, a)
        if self.needs_backward:
            if output.requires_grad:
                output.register_hook(lambda grad: self._backward(name, module, a, grad))
        elif "forward" in self.kinds:
            self._add(name, "forward", a)

    def _backward(self, name, module, a, grad) -> None:
        if not self._open:
            return  # a backward run after the block (through a graph built inside it) changes nothing
        with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
            d = self.rules[name].output_grads(module, _float(grad))
            d = self._masked(name, self.projector.project_output_grads(name, d))
            if self.observer is not None:
                self.observer(name, a, d, self.mask)
            if "grad" in self.kinds:
                g = torch.einsum("btgo,btgi->bgoi", d, a)
                self._add(name, "grad", self.projector.compress_grad(name, g))  # linear: Σ_calls commutes
            if "token_grad" in self.kinds:
                self._add(name, "token_grad", self._token_grads(name, d, a))
            if "forward" in self.kinds:
                self._add(name, "forward", a)
            if "backward" in self.kinds:
                self._add(name, "backward", d)

    def _token_grads(self, name, d, a) -> torch.Tensor:
        """Per-position gradients δ̃_t ã_tᵀ, (B, T, *grad_shape); Σ_t gives the per-sample gradient."""
        b, t = d.shape[:2]
        g = torch.einsum("btgo,btgi->btgoi", d, a).reshape(b * t, *d.shape[2:], a.shape[-1])
        g = self.projector.compress_grad(name, g)
        return g.reshape(b, t, *g.shape[1:])

    # -- helpers ----------------------------------------------------------------------------
    def _add(self, name: str, kind: str, value: torch.Tensor) -> None:
        slot = self.logs.setdefault(name, {})
        slot[kind] = value if kind not in slot else slot[kind] + value

    def _check_batch(self, name: str, b: int) -> None:
        if b == 0:
            raise ValueError(f"module {name!r} received an empty batch (0 examples): there is nothing to log; "
                             "skip empty batches before `with analog(...)`")
        if self.batch_size is not None and b != self.batch_size:
            raise ValueError(
                f"data_id has {self.batch_size} ids but module {name!r} received a batch of {b} examples; "
                "pass one id per example"
            )

    def _masked(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None or x.shape[1] == 1:
            return x
        if self.mask.shape != x.shape[:2]:
            raise ValueError(
                f"mask of shape {tuple(self.mask.shape)} does not fit module {name!r}, whose inputs have "
                f"{x.shape[1]} positions for {x.shape[0]} examples"
            )
        return x * self.mask.to(device=x.device, dtype=x.dtype)[:, :, None, None]


def guard_compiled_hooks() -> None:
    """Make ``torch.compile``d code re-check module hooks (see the module docstring)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None or not dynamo.config.skip_nnmodule_hook_guards:
        return  # nothing compiled yet (a later compile reads the flag), or guards already on
    dynamo.config.skip_nnmodule_hook_guards = False
    dynamo.reset()


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
