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

from typing import ClassVar, Dict, Optional, Union

import torch
from torch import nn

_REGISTRY: Dict[str, "LayerRule"] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
        """Gradient of the forward output -> δ of shape (B, T, groups, d_out)."""
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
