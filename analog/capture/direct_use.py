"""Layers whose weights their parent uses directly, without calling the layer.

analog reads a layer's per-sample gradient at its call: the forward hook sees the input (activations a)
and the output, whose gradient is δ. A parent whose ``forward`` takes a child layer's weights and uses
them in its own code never calls the child, so no hook on the child fires and nothing at the child's
boundary carries its per-sample gradient. Hugging Face's Mamba mixer is one: its ``forward`` hands
``conv1d.weight``/``conv1d.bias`` to ``causal_conv1d_fn`` (a depthwise causal convolution, fused with the
activation) and computes ``dt_proj.weight @ time_step`` by hand, with ``dt_proj.bias`` added inside the
selective scan before its softplus. The rule of an ``nn.Conv1d`` or an ``nn.Linear`` would be right for
these layers if they were called, but they are not.

Hugging Face marks such parents itself: ``forward`` is wrapped in
``transformers.integrations.accelerate.force_accelerate_hooks(child_names)`` so that accelerate's device
hooks of those children run (they too fire only when a module is called). ``used_without_call`` reads
that declaration (the wrapper's ``child_module_names``, found along the ``__wrapped__`` chain of the
parent class's ``forward``) and names each such child with the reason. ``watch`` leaves them out of the
default selection (the coverage report lists them with the reason) and refuses them when named exactly.
A model that uses weights directly without the declaration is still caught at run time: a watched module
that never runs in a block is named in a warning (analog.capture.completeness) and nothing is logged for it.
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

_DECLARATION = "force_accelerate_hooks."  # co_qualname prefix of the wrapper Hugging Face puts on such a forward


def declared_direct_children(cls: type) -> Tuple[str, ...]:
    """The attribute names of the children whose weights ``cls.forward`` uses without calling them, as its
    ``force_accelerate_hooks`` wrapper declares them (() when there is none)."""
    fn, seen, names = getattr(cls, "forward", None), set(), []
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        code = getattr(fn, "__code__", None)
        if code is not None and getattr(code, "co_qualname", "").startswith(_DECLARATION) \
                and "child_module_names" in code.co_freevars and fn.__closure__:
            value = fn.__closure__[code.co_freevars.index("child_module_names")].cell_contents
            names.extend([value] if isinstance(value, str) else list(value))
        fn = getattr(fn, "__wrapped__", None)
    return tuple(dict.fromkeys(names))


def used_without_call(model: nn.Module) -> Dict[str, str]:
    """{module name: reason} for every child layer of ``model`` whose parent uses its weights without calling it."""
    out = {}
    for parent_name, parent in model.named_modules():
        for child_name in declared_direct_children(type(parent)):
            child = getattr(parent, child_name, None)
            if not isinstance(child, nn.Module):
                continue  # a declared parameter or a missing attribute is no module to leave out
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            out[name] = (
                f"weights used directly by {type(parent).__name__}.forward, which never calls this "
                f"{type(child).__name__} (declared by force_accelerate_hooks): no hook on it fires, so its "
                "per-sample gradient is not recoverable at its boundary (unsupported)")
    return out
