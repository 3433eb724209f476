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

import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Union

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
    #: True when the rule's positions are the input's dimensions between the batch and the last one, flattened
    #: in order: an input (B, T, *S, D) has T·ΠS positions, so a (B, T) mask repeats over S (analog.capture.masks)
    channels_last: ClassVar[bool] = False

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

    def probe_input(self, module: nn.Module, generator: torch.Generator) -> Optional[torch.Tensor]:
        """A small random input of the registered layer (on its parameters' device and dtype; ``probe_like``),
        used to check that a subclass overriding ``forward`` computes the same (``forward_matches_base``);
        None: no probe (such a subclass is then left out)."""
        return None

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


def probe_like(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x`` (a CPU tensor) moved to the device of ``module``'s first parameter, in its dtype when floating;
    None for a module without parameters or with parameters on the meta device."""
    p = next(module.parameters(recurse=False), None)
    if p is None or p.is_meta:
        return None
    return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)


def registered_types() -> list:
    return sorted(_REGISTRY)


def _registered_base(cls: type) -> Tuple[Optional[type], Optional[LayerRule]]:
    """The nearest class in ``cls``'s MRO with a registered rule, and that rule (None, None when none)."""
    for base in cls.__mro__:
        rule = _REGISTRY.get(_qualname(base))
        if rule is not None:
            return base, rule
    return None, None


def overridden_forward(module: Union[nn.Module, type]) -> Optional[type]:
    """The registered base class when ``module``'s class subclasses it *and defines its own forward*, else None.

    A rule describes what its registered class's ``forward`` computes. A subclass that replaces ``forward``
    may compute something else with the same weights (Gemma's and BART's scaled word embeddings multiply
    the lookup by √d, BART's learned position embedding looks up positions + 2, not its input), so the
    base class's rule would log a wrong gradient without any error. Such a subclass keeps its base's rule
    only when a probe shows that it computes what its base computes (``forward_matches_base``).
    """
    cls = module if isinstance(module, type) else type(module)
    base, _ = _registered_base(cls)
    if base is None or base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None):
        return None
    return base


_PROBED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _probe(module: nn.Module, rule: LayerRule) -> Optional[torch.Tensor]:
    return rule.probe_input(module, torch.Generator().manual_seed(0))


def forward_matches_base(module: nn.Module, base: type, rule: LayerRule) -> bool:
    """True when ``type(module).forward`` returns what ``base.forward`` returns on the rule's probe input.

    The probe (``LayerRule.probe_input``: a few positions of random input, drawn from a private generator
    so the user's random stream is untouched) runs both forwards with the module's own parameters, without
    hooks or gradients; the outputs must agree to max(64 ε_float32, 4 ε_dtype) relative to their largest
    entry (Falcon's ``FalconLinear`` computes x Wᵀ + b by hand and passes; a √d-scaled embedding does not).
    A rule without a probe, a forward that raises on the probe, or parameters on the meta device give
    False. The answer is cached per module.
    """
    if module in _PROBED:
        return _PROBED[module]
    ok = False
    try:
        x = _probe(module, rule)
        if x is not None:
            with torch.no_grad():
                got, want = type(module).forward(module, x), base.forward(module, x)
            ok = _close(got, want)
    except Exception:  # noqa: BLE001 — any failure means "not shown to match"
        ok = False
    _PROBED[module] = ok
    return ok


def _close(got, want) -> bool:
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or got.shape != want.shape:
        return False
    if got.dtype != want.dtype or not got.is_floating_point():
        return bool(torch.equal(got, want))
    tol = max(64 * torch.finfo(torch.float32).eps, 4 * torch.finfo(got.dtype).eps)
    scale = max(float(want.abs().max()), 1e-30)
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * scale))


def overridden_forward_reason(module: Union[nn.Module, type]) -> Optional[str]:
    """Why a subclass that overrides ``forward`` is not logged (None when it does not, or matches its base)."""
    base = overridden_forward(module)
    if base is None:
        return None
    cls = module if isinstance(module, type) else type(module)
    what = "may compute something else"
    if not isinstance(module, type):
        rule = _registered_base(cls)[1]
        if forward_matches_base(module, base, rule):
            return None
        try:
            probed = _probe(module, rule) is not None
        except Exception:  # noqa: BLE001
            probed = False
        what = (f"computes something else than {base.__name__}.forward (checked on a probe input)" if probed else
                f"analog has no probe to check that it computes what {base.__name__}.forward computes")
    return (f"{cls.__name__} subclasses {base.__name__} but overrides forward and {what}, so "
            f"{base.__name__}'s rule may not describe it (unsupported): register a rule for it, e.g. class "
            f"MyRule(<the {base.__name__} rule>, module_type=\"{_qualname(cls)}\")")


def find_rule(module: Union[nn.Module, type]) -> Optional[LayerRule]:
    """The rule for a module (or module class), walking the class's MRO; None when there is none.

    A module whose class subclasses a registered class and defines its own ``forward`` (``overridden_forward``)
    gets its base's rule only when ``forward_matches_base`` shows that it computes the same; a class (no
    instance to probe) gets its base's rule.
    """
    cls = module if isinstance(module, type) else type(module)
    base, rule = _registered_base(cls)
    if rule is None:
        return None if isinstance(module, type) else recognised_rule(module)
    if isinstance(module, type) or overridden_forward(module) is None:
        return rule
    return rule if forward_matches_base(module, base, rule) else None


#: functions module -> rule or None, for layers of unregistered classes recognised by what they compute
#: (analog.capture.norm: the many Hugging Face RMSNorm copies); each must check its claim on probe inputs
RECOGNISERS: List[Callable[[nn.Module], Optional[LayerRule]]] = []
_RECOGNISED: "weakref.WeakKeyDictionary[nn.Module, Optional[LayerRule]]" = weakref.WeakKeyDictionary()


def recognised_rule(module: nn.Module) -> Optional[LayerRule]:
    """The rule of the first recogniser that accepts ``module`` (cached per module), or None."""
    if module in _RECOGNISED:
        return _RECOGNISED[module]
    rule = None
    for recognise in RECOGNISERS:
        try:
            rule = recognise(module)
        except Exception:  # noqa: BLE001 — a recogniser that fails does not recognise
            rule = None
        if rule is not None:
            break
    _RECOGNISED[module] = rule
    return rule


def get_rule(module: nn.Module, name: str = "") -> LayerRule:
    """The rule for ``module``; a clear error listing the registered types when none fits."""
    rule = find_rule(module)
    if rule is None:
        why = overridden_forward_reason(module)
        if why:
            raise TypeError(f"analog cannot log module {name or '<module>'!r}: {why}")
        raise TypeError(
            f"analog has no per-sample gradient rule for module {name or '<module>'!r} of type "
            f"{type(module).__name__}. Registered types: {', '.join(registered_types())}. "
            "Add one by subclassing analog.capture.LayerRule with module_type=YourLayer."
        )
    return rule
