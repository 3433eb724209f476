"""Name -> class registries for metrics and components, filled by decorators at import time."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

__all__ = ["Registry", "METRICS", "COMPONENTS", "register_metric", "register_component"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of classes; a lookup miss lists what is registered."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, replace: bool = False) -> Callable[[T], T]:
        def decorator(cls: T) -> T:
            if name in self._items and not replace and self._items[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' is already registered ({self._items[name]!r})")
            self._items[name] = cls
            cls.name = name
            return cls

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> List[str]:
        return sorted(self._items)


METRICS: Registry = Registry("metric")
COMPONENTS: Registry = Registry("component")


def register_metric(name: str, replace: bool = False):
    """Class decorator: ``@register_metric("my_metric") class MyMetric(BaseMetric): ...``."""
    return METRICS.register(name, replace)


def register_component(name: str, replace: bool = False):
    """Class decorator: ``@register_component("my_component") class C(BaseComponent): ...``."""
    return COMPONENTS.register(name, replace)
