"""One hook function for every watched module, and the path it takes under ``torch.compile``.

Dynamo traces forward hooks into the compiled graph. A hook whose Python does not trace (analog's
bookkeeping: dicts of logs, tensor hooks that mutate state) makes Dynamo break the graph there, and the
module calls after the break are compiled frame by frame, once per module shape — with a few dozen
modules of different shapes this hits ``config.recompile_limit`` (8) and falls back to eager. A new
``Capture`` object per block whose bound methods were the hooks would also fail the hook guards and
recompile every block.

So the hook registered on every module is this module's plain function ``capture_hook``, the same
object in every block, and under compilation it traces to two opaque custom ops that leave the graph
whole:

* ``analog::tap(out, x, key) -> out'`` (a copy of ``out``) in the forward: at run time it tells the
  open capture that module ``key`` ran on input ``x`` (checks, forward logs);
* its backward ``analog::receive(grad, x, key) -> grad'``: at run time it hands the output gradient and
  the saved input to the open capture, which computes the activations from ``x`` and the per-sample
  gradient exactly as in eager mode.

``key`` is a process-wide integer per module (``module_key``), so a graph compiled in one block is
reused by the next. Batch-1 inputs broadcast over the batch are expanded inside the traced hook from
the ``data_id`` count (``active_batch``; under compilation give ``data_id`` when the model has such
modules). Rules that recompute their call (``nn.MultiheadAttention``) keep the eager path under
compilation: a graph break at that module, exact logs.
"""

from __future__ import annotations

import itertools
import sys
from typing import Dict, List, Optional

import torch

from analog.capture.rules import LayerRule

_KEYS: Dict[int, int] = {}  # id(module) -> key
_NEXT = itertools.count()
#: the open Capture (at most one), and the data_id count of its block (0 when unknown)
ACTIVE: List[Optional[object]] = [None]
BATCH: List[int] = [0]
#: keys of modules whose rule recomputes the call (eager path even under compilation)
EAGER: set = set()


def module_key(module, rule: LayerRule) -> int:
    """The process-wide key of a watched module (assigned on first use, stable afterwards)."""
    key = _KEYS.get(id(module))
    if key is None:
        key = _KEYS[id(module)] = next(_NEXT)
    if type(rule).intercept is not LayerRule.intercept:
        EAGER.add(key)
    return key


def capture_hook(module, args, kwargs, output):
    """The forward hook of every watched module (see the module docstring)."""
    if READY[0] and torch.compiler.is_compiling():
        key = _KEYS[id(module)]
        if key not in EAGER:
            return _traced(key, args, kwargs, output)
    return _CALLS["eager"](module, args, kwargs, output)


def root_hook(module, args, kwargs) -> None:
    """Forward pre-hook of the watched model: the batch size of its call (when no ids are given)."""
    return _CALLS["root"](module, args, kwargs)


def _eager(module, args, kwargs, output):
    capture = ACTIVE[0]
    return None if capture is None else capture._forward_hook(module, args, kwargs, output)


def _root(module, args, kwargs) -> None:
    capture = ACTIVE[0]
    if capture is not None:
        capture.root_batch(args, kwargs)


_CALLS = {"eager": _eager, "root": _root}
READY = [False]


def setup() -> None:
    """Once torch._dynamo is in use (imported by ``torch.compile``): register the custom ops and make the
    eager parts opaque to Dynamo. Not done at import, so ``import analog`` does not import Dynamo."""
    if READY[0] or "torch._dynamo" not in sys.modules:
        return
    _register_ops()
    _CALLS.update(eager=torch._dynamo.disable(_eager), root=torch._dynamo.disable(_root))
    READY[0] = True


def _traced(key: int, args, kwargs, output):
    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    batch = BATCH[0]
    if batch > 1 and x.shape[0] == 1 and output.shape[0] == 1:
        output = output.expand(batch, *output.shape[1:])
    return torch.ops.analog.tap(output, x, key)


def _tap(out: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
    capture = ACTIVE[0]
    if capture is not None:
        capture.tapped_forward(key, x)
    return out.clone()


def _receive(grad: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
    capture = ACTIVE[0]
    if capture is not None:
        capture.tapped_backward(key, x, grad)
    return grad.clone()


def _like(t, *_):
    return torch.empty_like(t)


def _setup_context(ctx, inputs, output):
    _, x, key = inputs
    ctx.save_for_backward(x)
    ctx.key = key


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.analog.receive(grad, x, ctx.key), None, None


def _register_ops() -> None:
    tap = torch.library.custom_op("analog::tap", _tap, mutates_args=())
    tap.register_fake(_like)
    receive = torch.library.custom_op("analog::receive", _receive, mutates_args=())
    receive.register_fake(_like)
    tap.register_autograd(_backward, setup_context=_setup_context)
