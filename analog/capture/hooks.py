"""The hooks of one ``with analog(...)`` block.

``Capture`` registers a forward hook on every watched module when the block is entered and
removes every handle when it is left (also on an exception), so passes outside the block change
nothing; tensor hooks already placed on outputs are disarmed too, so a backward run after the
block through a graph built inside it leaves the logs as they were.

One hook function serves every watched module and every block (analog.capture.compiled: under
``torch.compile`` it traces to two opaque custom ops, so the graph stays whole). For each forward call
whose output needs a gradient, the forward hook keeps the (projected) activations ã and registers a
hook on that call's output tensor (for a batch-1 input broadcast over the batch, on the output
expanded to the batch: see analog.capture.broadcast); when the gradient arrives, the
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

import functools
import sys
import warnings
from collections import Counter
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from analog.capture import compiled
from analog.capture.completeness import check_complete
from analog.capture.masks import MaskArg, is_encoder_decoder, mask_for_factors, resolve_masks
from analog.capture.rules import Call, LayerRule
from analog.capture.tokens import position_grid, token_axis, token_products

#: observer(name, a, d, mask) is called with each call's factors (B, T, G, r_in), (B, T, G, r_out)
FactorObserver = Callable[[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


class Capture:
    """Per-batch capture of ``kinds`` ⊆ {"grad", "token_grad", "forward", "backward"} from watched modules.

    ``grad``: Σ_t δ̃_t ã_tᵀ per example (compressed); ``token_grad`` keeps one gradient per token (for
    per-token influence of queries; a per-head norm's heads are summed per token: analog.capture.tokens);
    ``forward``: the layer's input as it saw it, (B, *input_shape[1:]),
    float32, uncompressed (no bias column: that lives only inside the gradient maths); ``backward``: δ̃,
    (B, T, G, r_out). ``mask`` (see analog.capture.masks) reaches only the observer (statistics); it never
    changes a logged value. ``root`` (the watched model) tells the batch size when no ids are given.
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        rules: Dict[str, LayerRule],
        projector,
        kinds: Sequence[str],
        batch_size: Optional[int] = None,
        mask: MaskArg = None,
        observer: Optional[FactorObserver] = None,
        root: Optional[nn.Module] = None,
    ):
        self.modules, self.rules, self.projector = modules, rules, projector
        self.kinds = tuple(kinds)
        self.batch_size, self.observer, self.root = batch_size, observer, root
        # only a single-tensor mask asks (it cannot describe both sides); the walk over the model is skipped otherwise
        encoder_decoder = isinstance(mask, torch.Tensor) and root is not None and is_encoder_decoder(root)
        self.masks = resolve_masks(mask, modules, encoder_decoder)
        self._mask_given, self._mask_used = mask is not None, False
        self.needs_backward = bool({"grad", "token_grad", "backward"} & set(self.kinds)) or observer is not None
        self.logs: Dict[str, Dict[str, torch.Tensor]] = {}
        self.calls: Counter = Counter()  # forward calls whose output needs a gradient, per module
        self.grad_calls: Counter = Counter()  # gradients received, per module
        self.called: set = set()
        self.broadcast: Dict[str, int] = {}  # module -> batch size its batch-1 output was expanded to
        self.flattened: Dict[str, int] = {}  # module -> batch size its (B·T, …) rows were read back as (B, T, …)
        self._root_batch: Optional[int] = None
        self._root_length: Optional[int] = None  # dimension 1 of the model's first input (its tokens: per_token)
        self._names = {id(m): n for n, m in modules.items()}
        self._by_key = {compiled.module_key(m, rules[n]): n for n, m in modules.items()}
        self._handles = []
        self._open = False

    def __enter__(self) -> "Capture":
        if compiled.ACTIVE[0] is not None:
            raise RuntimeError("another `with analog(...)` block is open; blocks cannot be nested")
        guard_compiled_hooks()
        compiled.setup()
        self._open = True
        compiled.ACTIVE[0], compiled.BATCH[0] = self, self.batch_size or 0
        try:
            for module in self.modules.values():  # one hook function for every module and every block
                self._handles.append(module.register_forward_hook(compiled.capture_hook, with_kwargs=True))
            if self.root is not None and (self.batch_size is None or "token_grad" in self.kinds):
                self._handles.append(self.root.register_forward_pre_hook(compiled.root_hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        self._warn_flattened()

    def remove(self) -> None:
        """Remove the module hooks and disarm the tensor hooks already placed on outputs."""
        self._open = False
        if compiled.ACTIVE[0] is self:
            compiled.ACTIVE[0], compiled.BATCH[0] = None, 0
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks ------------------------------------------------------------------------------
    def root_batch(self, args, kwargs) -> None:
        if self._root_batch is None:
            first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
            self._root_batch = None if first is None else first.shape[0]
            self._root_length = first.shape[1] if first is not None and first.dim() >= 2 else None

    # -- the torch.compile path (analog.capture.compiled) ---------------------------------------
    def tapped_forward(self, key: int, x: torch.Tensor) -> None:
        name = self._by_key.get(key)
        if name is None or not self._open:
            return
        module = self.modules[name]
        self.rules[name].check_call(module, name)
        expand = self._expand_to(name, x)
        if expand and not compiled.BATCH[0]:
            raise ValueError(f"module {name!r} received a batch-1 input broadcast over the batch; under torch.compile "
                             "pass data_id=... so that analog can expand it to the batch")
        self.called.add(name)
        if self.needs_backward:
            self.calls[name] += 1
        elif "forward" in self.kinds:
            x = _float(x.detach())
            self._add(name, "forward", x.expand(expand, *x.shape[1:]) if expand else x)

    def tapped_backward(self, key: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        name = self._by_key.get(key)
        if name is None or not self._open:
            return
        module = self.modules[name]
        expand = grad.shape[0] if x.shape[0] != grad.shape[0] else 0  # a batch-1 input expanded in the traced hook
        a, x, mask = self._factors(name, module, x, expand)
        tokens = self._token_layout(name, x.shape, a.shape[1])
        self._backward(name, module, a, mask, x if "forward" in self.kinds else None, (grad,), tokens=tokens)

    def _forward_hook(self, module, args, kwargs, output):
        name = self._names[id(module)]
        rule = self.rules[name]
        rule.check_call(module, name)
        call = rule.intercept(module, args, kwargs, output, name)
        fold = self._folded(name, call)
        expand = 0 if fold else self._expand_to(name, call.x)
        self.called.add(name)
        a, x, mask = self._factors(name, module, _unfold(call.x, fold), expand)
        shape = x.shape
        if expand:
            call = self._expanded(name, call, expand)
        sites = call.sites
        x = x if "forward" in self.kinds else None
        if not self.needs_backward:
            if x is not None:
                self._add(name, "forward", x)
        elif any(t.requires_grad for t in sites):
            self.calls[name] += 1
            tokens = self._token_layout(name, shape, a.shape[1])
            pending = _Pending(functools.partial(self._backward, name, module, a, mask, x, fold=fold, tokens=tokens),
                               sites)
            for i, t in enumerate(sites):
                if t.requires_grad:
                    t.register_hook(functools.partial(pending.receive, i))
        return call.output if call.replaced else None

    def _factors(self, name: str, module, x: torch.Tensor, expand: int):
        """(ã, x, mask) of one call: x as float32, its projected activations ã (float32 even inside the
        user's autocast region), both expanded to ``expand`` examples for a batch-1 broadcast input (0: as
        they are), and the statistics mask that fits ã (analog.capture.masks)."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = _float(x.detach())
            a = self.projector.project_activations(name, module, self.rules[name], x)
            if expand:
                a, x = a.expand(expand, *a.shape[1:]), x.expand(expand, *x.shape[1:])
            rule = self.rules[name]
            mask = mask_for_factors(self.masks.get(name), name, a, x.shape if rule.channels_last else None)
        self._mask_used |= mask is not None
        return a, x, mask

    @staticmethod
    def _expanded(name, call: Call, batch: int) -> Call:
        """A batch-1 output handed to the model expanded to the batch (see analog.capture.broadcast)."""
        out = call.output
        if call.replaced or call.sites != (out,) or out.shape[0] != 1:
            raise ValueError(f"module {name!r} received a batch-1 input but its output cannot be expanded to the "
                             f"batch of {batch}; leave it out with watch(..., exclude=[{name!r}])")
        out = out.expand(batch, *out.shape[1:])
        return Call(out, call.x, (out,), replaced=True)

    def _folded(self, name: str, call: Call) -> int:
        """B when the call's input is the batch flattened to (B·T, …) rows, else 0.

        Some models flatten the tokens of a batch-first (B, T, D) tensor to (B·T, D) rows before a layer (OPT's
        final_layer_norm, fc1 and fc2: ``hidden.reshape(-1, D)``); row b·T + t is then token t of example b. This
        is accepted only when a (B, T) mask was given for the module (it states T), the input has B·T rows,
        the rule reads channels-last rows (``LayerRule.channels_last``: Linear, the norms) and the call's only
        gradient site is its output with the same rows; the input and the output gradient are then read as
        (B, T, …) and every logged gradient, statistic and per-token share is that of the unflattened layer.
        A warning names the module, since a model that flattened (T, B, D) (time-major) would break this.
        """
        x, mask = call.x, self.masks.get(name)
        batch = self.batch_size if self.batch_size is not None else self._root_batch
        if (mask is None or batch is None or x.dim() < 2 or not self.rules[name].channels_last
                or mask.shape[0] != batch or mask.shape[1] < 2 or x.shape[0] != batch * mask.shape[1]
                or call.replaced or len(call.sites) != 1 or call.sites[0].shape[0] != x.shape[0]):
            return 0
        self.flattened[name] = batch
        return batch

    def _warn_flattened(self) -> None:
        """One warning per module (per process) that received flattened rows (``_folded``)."""
        new = [n for n in self.flattened if id(self.modules[n]) not in _FOLD_WARNED]
        if not new:
            return
        _FOLD_WARNED.update(id(self.modules[n]) for n in new)
        more = f" and {len(new) - 4} more" if len(new) > 4 else ""
        warnings.warn(f"{len(new)} watched module(s) received the batch flattened to (examples × positions, …) rows: "
                      f"{', '.join(repr(n) for n in new[:4])}{more}. analog reads row b·T + t as position t of "
                      "example b (T: the mask's positions), as reshape(-1, d) of a batch-first (B, T, d) tensor "
                      "gives; a model that flattens (T, B, d) would need those modules excluded",
                      stacklevel=4)

    def _expand_to(self, name: str, x: torch.Tensor) -> int:
        """The batch size to expand a batch-1 (broadcast) input to, or 0 when the input has the batch."""
        if x.dim() == 0:
            raise ValueError(f"module {name!r} received a 0-d input; analog needs a leading batch dimension")
        lead = x.shape[0]
        if lead == 0:
            raise ValueError(f"module {name!r} received an empty batch (0 examples): there is nothing to log; "
                             "skip empty batches before `with analog(...)`")
        batch = self.batch_size if self.batch_size is not None else self._root_batch
        if batch is None or lead == batch:
            return 0
        if lead == 1:
            self.broadcast[name] = batch
            return batch
        source = f"data_id has {batch} ids" if self.batch_size is not None else \
            f"the model was called with a batch of {batch} (pass data_id to state it)"
        flat = ""
        if lead % batch == 0 and self.masks.get(name) is None and self.rules[name].channels_last:
            flat = (f"; if it is the batch flattened to {batch} × {lead // batch} (examples × positions) rows, as "
                    "OPT's MLP reshapes its input, pass mask=attention_mask (B, T) to `with analog(...)`, which "
                    "lets analog read the rows back per example")
        raise ValueError(
            f"{source} but module {name!r} received a batch of {lead} (the leading dimension of its input): pass "
            "one id per example; if this module's input has no batch dimension in front, its per-sample gradients "
            f"cannot be recovered at its boundary: leave it out with watch(..., exclude=[{name!r}]){flat}")

    def _backward(self, name, module, a, mask, x, grads, fold: int = 0, tokens=None) -> None:
        if not self._open:
            return  # a backward run after the block (through a graph built inside it) changes nothing
        self.grad_calls[name] += 1
        grads = tuple(_unfold(g, fold) for g in grads)
        grad = _float(grads[0]) if len(grads) == 1 else tuple(_float(g) for g in grads)
        with torch.no_grad(), torch.autocast(a.device.type, enabled=False):
            d = self.rules[name].output_grads(module, grad)
            d = self.projector.project_output_grads(name, d)
            if self.observer is not None:
                if mask is None:
                    self.observer(name, a, d, None)
                else:
                    m = mask[:, :, None, None]
                    self.observer(name, a * m, d * m, mask)
            if "grad" in self.kinds:
                g = torch.einsum("btgo,btgi->bgoi", d, a)
                self._add(name, "grad", self.projector.compress_grad(name, g))  # linear: Σ_calls commutes
            if "token_grad" in self.kinds:
                self._add(name, "token_grad", self._token_grads(name, d, a, tokens))
            if x is not None:
                self._add(name, "forward", x)
            if "backward" in self.kinds:
                self._add(name, "backward", d)

    def _token_layout(self, name: str, shape: torch.Size, positions: int):
        """(grid, token axis) of a call whose ``positions`` per example are tokens × heads (analog.capture.tokens),
        None when each position is a token (or no per-token gradients are asked for)."""
        if "token_grad" not in self.kinds or not self.rules[name].channels_last:
            return None
        grid = position_grid(shape, positions)
        mask = self.masks.get(name)
        if mask is not None:
            t, source = mask.shape[1], "its mask"
        else:
            t, source = self._root_length, "the watched model's first input"
        axis = token_axis(name, grid, t, source)
        return None if axis is None else (grid, axis)

    def _token_grads(self, name, d, a, tokens=None) -> torch.Tensor:
        """Per-token gradients, (B, T, *grad_shape); Σ_t gives the per-sample gradient. ``tokens``: the (grid, token
        axis) of a call whose positions are tokens × heads (``_token_layout``), None when each position is a token."""
        g = token_products(d, a, *(tokens or ((), None)))
        b, t = g.shape[:2]
        g = self.projector.compress_grad(name, g.reshape(b * t, *g.shape[2:]))
        return g.reshape(b, t, *g.shape[1:])

    # -- end of the block -------------------------------------------------------------------
    def finish(self, ids: Optional[list]) -> None:
        """Checks once the block is left: see analog.capture.completeness."""
        check_complete(self, ids)

    # -- helpers ----------------------------------------------------------------------------
    def _add(self, name: str, kind: str, value: torch.Tensor) -> None:
        slot = self.logs.setdefault(name, {})
        if kind == "forward" and kind in slot:
            raise ValueError(f"module {name!r} was called more than once in this block; 'forward' logs keep the "
                             "input of one call (log 'grad' for modules used several times)")
        slot[kind] = value if kind not in slot else slot[kind] + value


class _Pending:
    """Collects the gradients of one call's sites; calls ``done(grads)`` once all have arrived. A site
    that needs no gradient counts as a zero gradient (exact: nothing flows through it)."""

    def __init__(self, done, sites):
        self.done = done
        self.grads = [None if t.requires_grad else torch.zeros_like(t) for t in sites]
        self.missing = sum(g is None for g in self.grads)

    def receive(self, index: int, grad: torch.Tensor) -> None:
        if self.grads[index] is None:
            self.missing -= 1
        self.grads[index] = grad
        if self.missing == 0:
            self.done(tuple(self.grads))


def guard_compiled_hooks() -> None:
    """Make ``torch.compile``d code re-check module hooks (see the module docstring)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None or not dynamo.config.skip_nnmodule_hook_guards:
        return  # nothing compiled yet (a later compile reads the flag), or guards already on
    dynamo.config.skip_nnmodule_hook_guards = False
    dynamo.reset()


_FOLD_WARNED: set = set()  # id() of modules already named in a flattened-rows warning


def _unfold(t: torch.Tensor, fold: int) -> torch.Tensor:
    """(B·T, …) rows -> (B, T, …) for a folded call (``Capture._folded``); unchanged when ``fold`` is 0."""
    return t.reshape(fold, -1, *t.shape[1:]) if fold else t


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
