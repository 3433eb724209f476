"""Per-layer rules: the Kronecker form of a layer's per-sample weight gradient.

For a layer whose weight gradient of one sample b is a sum over positions t (tokens, pixels),

    G_b[g] = Σ_t  δ_{b,t,g}  a_{b,t,g}ᵀ        shape (groups, d_out, d_in)

a rule says how to read the *activations* a (from the forward inputs) and the *output
gradients* δ (from the gradient of the output) as tensors of shape (B, T, groups, d). A bias is
folded in as a trailing column of ones in a (so G_b[..., -1] is the bias gradient). Everything
downstream — LoGra projection, K-FAC statistics, storage — works on these two factors only, so
supporting a new layer type is one new rule.

Rules are registered by module class through ``__init_subclass__(module_type=...)``; the lookup
walks the class's MRO, so subclasses of a registered layer are covered. ``module_type`` may be a
class or a dotted import path (for optional dependencies such as Hugging Face ``Conv1D``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import nn

_REGISTRY: Dict[str, "LayerRule"] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class Call:
    """One forward call as the capture sees it.

    ``output``: what the module returns to the model; ``x``: the input that ``activations`` reads
    (batch first); ``sites``: the tensors whose gradients ``output_grads`` turns into δ (by default the
    output alone); ``replaced``: True when ``output`` is not the module's own (the hook returns it).
    """

    output: Any
    x: torch.Tensor
    sites: Tuple[torch.Tensor, ...]
    replaced: bool = False


class LayerRule:
    """Base class of a per-layer rule. Subclass with ``module_type=`` to register one."""

    module_type: ClassVar[Union[type, str]]

    def __init_subclass__(cls, module_type: Union[type, str, None] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if module_type is None:
            return
        cls.module_type = module_type
        key = module_type if isinstance(module_type, str) else _qualname(module_type)
        _REGISTRY[key] = cls()

    # -- what the rule covers ----------------------------------------------------------------
    def covered_params(self, module: nn.Module) -> Dict[str, nn.Parameter]:
        """The parameters whose per-sample gradients this rule yields (default: the module's own)."""
        return dict(module.named_parameters(recurse=False))

    def unsupported(self, module: nn.Module) -> Optional[str]:
        """Why this module's configuration cannot be logged (checked at ``watch``), or None."""
        return None

    def check_call(self, module: nn.Module, name: str) -> None:
        """Raise a clear error when this call cannot give per-sample gradients (e.g. BatchNorm training)."""

    def intercept(self, module: nn.Module, args: tuple, kwargs: dict, output: Any, name: str) -> Call:
        """The call as the capture sees it: by default the first tensor input and the output.

        A rule whose layer uses its weights inside one call several times (``nn.MultiheadAttention``)
        recomputes the call here from the same inputs and weights and returns several gradient sites.
        """
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"module {name!r} returned {type(output).__name__}; analog expects a tensor")
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if x is None:
            raise TypeError(f"module {name!r} was called without a tensor input")
        return Call(output, x, (output,))

    # -- shapes -----------------------------------------------------------------------------
    def groups(self, module: nn.Module) -> int:
        return 1

    def in_dim(self, module: nn.Module) -> int:
        """d_in per group, including the bias column when the layer has a bias."""
        raise NotImplementedError

    def out_dim(self, module: nn.Module) -> int:
        """d_out per group."""
        raise NotImplementedError

    # -- factors ----------------------------------------------------------------------------
    def activations(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input ``x`` of the forward call -> a of shape (B, T, groups, d_in)."""
        raise NotImplementedError

    def project_activations(self, module: nn.Module, x: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        """a @ P_in of shape (B, T, groups, r_in); rules may avoid forming a (Embedding does)."""
        return self.activations(module, x) @ p_in

    def output_grads(self, module: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
        """Gradient of the forward output -> δ of shape (B, T, groups, d_out) (for a rule with several
        gradient sites, ``grad_out`` is the tuple of their gradients)."""
        raise NotImplementedError

    # -- back to parameters -----------------------------------------------------------------
    def param_grads(self, module: nn.Module, grad: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Uncompressed per-sample G (B, groups, d_out, d_in) -> {param name: (B, *param.shape)}."""
        raise NotImplementedError


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def append_ones(a: torch.Tensor) -> torch.Tensor:
    """Append the homogeneous coordinate (a column of ones) on the last dimension."""
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def registered_types() -> list:
    return sorted(_REGISTRY)


def find_rule(module: Union[nn.Module, type]) -> Optional[LayerRule]:
    """The rule for a module (or module class), walking the class's MRO; None when there is none."""
    for cls in (module if isinstance(module, type) else type(module)).__mro__:
        rule = _REGISTRY.get(_qualname(cls))
        if rule is not None:
            return rule
    return None


def get_rule(module: nn.Module, name: str = "") -> LayerRule:
    """The rule for ``module``; a clear error listing the registered types when none fits."""
    rule = find_rule(module)
    if rule is None:
        raise TypeError(
            f"analog has no per-sample gradient rule for module {name or '<module>'!r} of type "
            f"{type(module).__name__}. Registered types: {', '.join(registered_types())}. "
            "Add one by subclassing analog.capture.LayerRule with module_type=YourLayer."
        )
    return rule
