"""Choosing which modules to log."""

from __future__ import annotations

import fnmatch
from typing import Dict, Optional, Sequence, Union

from torch import nn

from analog.capture import find_rule, registered_types


def select_modules(
    model: nn.Module,
    type_filter: Optional[Sequence[Union[type, str]]] = None,
    name_filter: Optional[Sequence[str]] = None,
) -> Dict[str, nn.Module]:
    """Modules of ``model`` to watch, by qualified name.

    ``type_filter``: module classes (or class names) to keep; a listed type with no rule is an
    error. ``name_filter``: substrings or glob patterns of module names. With neither, every
    module that has a rule is watched. Selecting nothing is an error.
    """
    if type_filter is not None:
        for t in type_filter:
            if isinstance(t, type) and find_rule(t) is None:
                raise TypeError(f"type_filter names {t.__name__}, which analog cannot log; "
                                f"registered: {', '.join(registered_types())}")
    chosen: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not _type_ok(module, type_filter) or not _name_ok(name, name_filter):
            continue
        if find_rule(module) is None:
            if type_filter is not None or (name_filter is not None and _name_explicit(name, name_filter)):
                raise TypeError(f"module {name!r} ({type(module).__name__}) was selected but analog has no "
                                f"rule for it; registered: {', '.join(registered_types())}")
            continue
        chosen[name] = module
    if not chosen:
        hint = ""
        if find_rule(model) is not None and not any(True for _ in model.children()):
            hint = (f"; the model itself is a bare {type(model).__name__} and analog watches named submodules: "
                    "wrap it, e.g. nn.Sequential(model)")
        raise ValueError(f"watch() selected no module of {type(model).__name__} "
                         f"(type_filter={type_filter}, name_filter={name_filter}); loggable types: "
                         f"{', '.join(registered_types())}{hint}")
    return chosen


def _type_ok(module, type_filter) -> bool:
    if type_filter is None:
        return True
    return any(isinstance(module, t) if isinstance(t, type) else type(module).__name__ == t for t in type_filter)


def _name_ok(name: str, name_filter) -> bool:
    if name_filter is None:
        return True
    return any(p in name or fnmatch.fnmatchcase(name, p) for p in name_filter)


def _name_explicit(name: str, name_filter) -> bool:
    return any(p == name for p in name_filter)
