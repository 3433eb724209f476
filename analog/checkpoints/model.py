"""Build a model from a class defined in a Python file and load checkpoints into it strictly."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Mapping, Optional, Type, Union

import torch

from .loading import CheckpointError

__all__ = ["import_file", "load_model_class", "load_strict", "strip_wrapper_prefix"]


def import_file(path: Union[str, Path], module_name: Optional[str] = None) -> ModuleType:
    """Import a Python file as a module (its top-level code runs: only use files you trust).

    No bytecode cache is written: importing ``--model``/``--custom-metrics`` files must not leave a
    ``__pycache__/`` folder beside the user's sources (only the output directory is written to).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Python file not found: {path}")
    name = module_name or f"analog_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


def load_model_class(path: Union[str, Path], class_name: Optional[str] = None) -> Type[torch.nn.Module]:
    """The ``nn.Module`` subclass ``class_name`` from ``path``; inferred when the file defines exactly one."""
    module = import_file(path)
    if class_name is not None:
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
            raise ValueError(f"{path}: no nn.Module subclass named '{class_name}'")
        return cls
    defined = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == module.__name__
    ]
    if len(defined) != 1:
        names = ", ".join(c.__name__ for c in defined) or "none"
        raise ValueError(f"{path}: cannot infer the model class (found {names}); pass --class-name")
    return defined[0]


#: wrapper prefixes that training frameworks put in front of every key of the model's own state dict
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")


def strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor], expected_keys) -> Mapping[str, torch.Tensor]:
    """``state_dict`` with a wrapper's key prefix removed, when that makes its keys exactly ``expected_keys``.

    Lightning saves a ``LightningModule`` holding ``self.model`` as ``model.fc1.weight``, DDP as
    ``module.fc1.weight``, ``torch.compile`` as ``_orig_mod.fc1.weight`` (also stacked:
    ``model.module.``). Prefixes of ``WRAPPER_PREFIXES`` are removed one at a time while every key
    carries the same one; the result is used only if its key set equals ``expected_keys``, so a
    checkpoint of another model still fails with its own keys listed.
    """
    expected = set(expected_keys)
    current = dict(state_dict)
    while set(current) != expected:
        prefix = next((p for p in WRAPPER_PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if prefix is None:
            return state_dict
        current = {k[len(prefix) :]: v for k, v in current.items()}
    return current


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key is an error.

    Keys behind a wrapper prefix (``model.``, ``module.``, ``_orig_mod.``: Lightning, DDP,
    ``torch.compile``) are matched once the prefix is removed (:func:`strip_wrapper_prefix`). The
    comparison happens before anything is copied, so a failed load never leaves a half-loaded
    model behind.
    """
    expected = model.state_dict()
    state_dict = strip_wrapper_prefix(state_dict, expected)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected))
        if mis_shaped:
            parts.append("shape mismatches: " + "; ".join(mis_shaped))
        raise CheckpointError(f"{source}: checkpoint does not match {type(model).__name__} ({'; '.join(parts)})")
    model.load_state_dict(dict(state_dict), strict=True)
