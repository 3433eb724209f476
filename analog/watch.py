"""Choosing which modules to log, and saying what that covers.

``watch_model`` picks every module that has a per-sample rule (``analog.capture``), minus

* what ``type_filter`` / ``name_filter`` leave out and what ``exclude`` names (substrings or globs; an
  ``exclude`` pattern that matches no module name is an error, as a typo would otherwise go unnoticed),
* frozen modules (no parameter with ``requires_grad``): nothing to log; named in the coverage,
* configurations a rule cannot log (``LayerRule.unsupported``, e.g. BatchNorm without running stats),
* modules whose per-sample gradients are not recoverable at their boundary (analog.capture.broadcast),
* layers whose parent uses their weights directly without calling them (analog.capture.direct_use:
  the Mamba mixer's ``conv1d`` and ``dt_proj``),
* layers whose parameters an enclosing layer's rule already covers (``nn.MultiheadAttention.out_proj``
  is used by weight inside its parent's call, never called itself),

and builds the coverage report (analog.capture.coverage), warning also when watched modules share a
parameter (tied weights: their cross terms are not logged). A module the user *names exactly* in
``name_filter`` (or selects by ``type_filter``) that cannot be logged is an error with the reason;
what the default selection leaves out is a warning when it holds trainable parameters.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

from torch import nn

from analog.capture import find_rule, registered_types
from analog.capture.broadcast import unrecoverable_reason
from analog.capture.coverage import Coverage, build_coverage
from analog.capture.direct_use import used_without_call
from analog.capture.rules import LayerRule, overridden_forward_reason


@dataclass
class Watched:
    """The result of ``watch_model``: modules and rules by name, the model, and the coverage report."""

    modules: Dict[str, nn.Module]
    rules: Dict[str, LayerRule]
    root: nn.Module
    coverage: Coverage


def watch_model(
    model: nn.Module,
    type_filter: Optional[Sequence[Union[type, str]]] = None,
    name_filter: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    warn: bool = True,
) -> Watched:
    """Select the modules of ``model`` to log (see the module docstring); warn when coverage is incomplete."""
    _check_type_filter(type_filter)
    _check_exclude(model, exclude)
    chosen: Dict[str, nn.Module] = {}
    reasons: Dict[str, str] = {}
    frozen, user_excluded, claimed = [], [], set()
    direct = used_without_call(model)
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(c + ".") for c in claimed):
            continue  # used by weight inside an enclosing layer's call (covered by that layer's rule)
        rule = find_rule(module)
        if rule is not None and _claims_children(rule, module):
            claimed.add(name)
        if not _type_ok(module, type_filter) or not _name_ok(name, name_filter) or _excluded(name, exclude):
            if rule is not None:
                reasons[name] = "left out by name_filter/type_filter/exclude"
            user_excluded.append(name)
            continue
        explicit = type_filter is not None or (name_filter is not None and _name_explicit(name, name_filter))
        if rule is None:
            if explicit:
                why = overridden_forward_reason(module)
                if why:
                    raise TypeError(f"module {name!r} was selected but analog cannot log it: {why}")
                raise TypeError(f"module {name!r} ({type(module).__name__}) was selected but analog has no "
                                f"rule for it; registered: {', '.join(registered_types())}")
            continue
        reason = rule.unsupported(module) or unrecoverable_reason(name, module) or direct.get(name)
        if reason:
            if explicit and _name_explicit(name, name_filter or ()):
                raise ValueError(f"module {name!r} ({type(module).__name__}) cannot be logged: {reason}")
            reasons[name] = reason
            continue
        params = rule.covered_params(module)
        if not any(p.requires_grad for p in params.values()):
            if params:
                frozen.append(name)
            continue
        chosen[name] = module
    if not chosen:
        _nothing_selected(model, type_filter, name_filter, exclude, reasons, frozen)
    rules = {name: find_rule(m) for name, m in chosen.items()}
    coverage = build_coverage(model, chosen, rules, reasons, frozen, user_excluded)
    for message in (coverage.warning(), coverage.tied_warning()):
        if warn and message:
            warnings.warn(message, stacklevel=3)
    return Watched(chosen, rules, model, coverage)


def select_modules(model, type_filter=None, name_filter=None, exclude=None) -> Dict[str, nn.Module]:
    """{name: module} that ``watch_model`` selects (without the coverage warning)."""
    return watch_model(model, type_filter, name_filter, exclude, warn=False).modules


def _claims_children(rule: LayerRule, module: nn.Module) -> bool:
    own = {id(p) for p in module.parameters(recurse=False)}
    return any(id(p) not in own for p in rule.covered_params(module).values())


def _check_type_filter(type_filter) -> None:
    for t in type_filter or ():
        if isinstance(t, type) and find_rule(t) is None:
            raise TypeError(f"type_filter names {t.__name__}, which analog cannot log; "
                            f"registered: {', '.join(registered_types())}")


SHOWN_NAMES = 20  # module names an error lists before "and N more"


def _loggable_names(model: nn.Module) -> list:
    """'name' (Type) of every named submodule with a per-sample rule, in model order."""
    return [f"{name!r} ({type(m).__name__})" for name, m in model.named_modules()
            if name and find_rule(m) is not None]


def _listed(items: list, what: str) -> str:
    if not items:
        return f"no {what}"
    more = f", and {len(items) - SHOWN_NAMES} more" if len(items) > SHOWN_NAMES else ""
    return f"{what}: {', '.join(items[:SHOWN_NAMES])}{more}"


def _filters(type_filter, name_filter, exclude) -> str:
    given = {"name_filter": name_filter, "type_filter": type_filter, "exclude": exclude}
    return ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)


def _check_exclude(model: nn.Module, exclude) -> None:
    """An ``exclude`` pattern that matches no module name is an error (most likely a typo or another model's name)."""
    if not exclude:
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in exclude if not any(_excluded(name, [p]) for name in names)]
    if unmatched:
        raise ValueError(
            f"watch(exclude={list(exclude)!r}): {unmatched!r} matched no module of {type(model).__name__} "
            "(a pattern matches a module name as a substring or a glob); drop or correct it. "
            f"The model's {_listed(_loggable_names(model), 'loggable modules')}")


def _nothing_selected(model, type_filter, name_filter, exclude, reasons, frozen) -> None:
    kind = type(model).__name__
    if find_rule(model) is not None and not any(True for _ in model.children()):
        raise ValueError(
            f"watch() selected no module: the model itself is a bare {kind} with no submodules, and analog "
            f"logs a model's named submodules, not the model itself: wrap it, e.g. "
            f"analog.watch(nn.Sequential(model)) (the {kind} is then logged as module '0')")
    loggable = _loggable_names(model)
    filters = _filters(type_filter, name_filter, exclude)
    if not loggable:
        torch_types = [t.rsplit(".", 1)[1] for t in registered_types() if t.startswith("torch.")]
        raise ValueError(
            f"watch() selected no module: {kind} has no submodule analog can log (torch types it logs: "
            f"{', '.join(torch_types)}; all: analog.capture.registered_types())")
    if filters:
        raise ValueError(
            f"watch() selected no module: {filters} left none of {kind}'s loggable modules (name_filter and "
            "exclude patterns match a module name as a substring or a glob). "
            f"Its {_listed(loggable, 'loggable modules')}")
    why = [f"{name!r}: {reason}" for name, reason in reasons.items()]
    why += [f"{name!r}: frozen (no parameter requires grad)" for name in frozen]
    raise ValueError(f"watch() selected no module: none of {kind}'s loggable modules can be logged; "
                     f"{_listed(why, 'why')}")


def _type_ok(module, type_filter) -> bool:
    if type_filter is None:
        return True
    return any(isinstance(module, t) if isinstance(t, type) else type(module).__name__ == t for t in type_filter)


def _name_ok(name: str, name_filter) -> bool:
    if name_filter is None:
        return True
    return any(p in name or fnmatch.fnmatchcase(name, p) for p in name_filter)


def _excluded(name: str, exclude) -> bool:
    return bool(exclude) and any(p in name or fnmatch.fnmatchcase(name, p) for p in exclude)


def _name_explicit(name: str, name_filter) -> bool:
    return any(p == name for p in name_filter)
