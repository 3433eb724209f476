"""Custom metrics from a Python file.

The file may register classes with ``@register_metric`` (imported, so decorators run), and may
define Phase-Viz style functions ``def name_of_model(model) -> float``; each such function is
registered as a model metric under its own name (``sparsity_of_model``). Importing a file runs its
code: only load files you trust.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, List, Union

import torch

from analog.checkpoints.model import import_file

from .base import BaseModelMetric
from .registry import METRICS

__all__ = ["function_metric", "load_custom_metrics"]


def function_metric(name: str, fn: Callable[[torch.nn.Module], float]) -> type:
    """A :class:`BaseModelMetric` subclass that calls ``fn(model)`` and checks it returns a real number."""

    def compute_model(self, model: torch.nn.Module) -> float:
        value = fn(model)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"custom metric '{name}' returned {type(value).__name__}, expected a float")
        return float(value)

    doc = inspect.getdoc(fn) or f"Custom metric {name}(model) -> float."
    return type(f"FunctionMetric_{name}", (BaseModelMetric,), {"compute_model": compute_model, "__doc__": doc})


def load_custom_metrics(path: Union[str, Path]) -> List[str]:
    """Import ``path``; register its ``*_of_model`` functions. Returns the names it added, in order."""
    before = set(METRICS.names())
    module = import_file(path)
    added = [name for name in METRICS.names() if name not in before]
    for name, fn in vars(module).items():
        if not (name.endswith("_of_model") and inspect.isfunction(fn) and fn.__module__ == module.__name__):
            continue
        params = inspect.signature(fn).parameters
        if len(params) != 1:
            raise TypeError(f"{path}: {name} must take exactly one argument (the model), takes {len(params)}")
        METRICS.register(name, replace=True)(function_metric(name, fn))
        added.append(name)
    if not added:
        raise ValueError(f"{path}: no '*_of_model(model)' functions or @register_metric classes found")
    return added
