"""Old public names kept as aliases that warn: ``module.__getattr__ = deprecated_names(...)``.

Each product of analog has its own names (``MetricsConfig`` for checkpoint metrics, ``MonitorConfig``
for the training monitor, ...). Names that were public before a rename still resolve, with a
:class:`DeprecationWarning` that says what to use instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Tuple


def deprecated_names(module: str, aliases: Dict[str, Tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``old`` -> ``new`` for ``aliases = {old: (new, getter)}``."""

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, getter = aliases[name]
            warnings.warn(
                f"{module}.{name} is deprecated; use {module}.{new}", DeprecationWarning, stacklevel=2
            )
            return getter()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
