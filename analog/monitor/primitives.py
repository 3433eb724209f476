"""Immutable primitives of the training monitor: a snapshot of parameters and the change between two.

``ParameterSnapshot`` holds W_t (one detached copy per named parameter, on ``device`` in ``dtype``);
``ParameterDelta`` holds Δ = W_new − W_old for two snapshots of the same parameter set, with its
global statistics. Neither object is mutated after construction: their mappings are read-only and
their tensors are private copies that no code in this package writes to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

SNAPSHOT_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ParameterSetMismatch(ValueError):
    """Two snapshots do not hold the same parameter names and shapes."""


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """Map ``"float32"``-style names (or a ``torch.dtype``) to a floating ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"unknown snapshot dtype {dtype!r}; choose one of {sorted(SNAPSHOT_DTYPES)}")
    return SNAPSHOT_DTYPES[dtype]


class ParameterSnapshot:
    """Parameters of a model at one optimizer step, copied to ``device`` in ``dtype``.

    Memory: ``numel * dtype.itemsize`` bytes (4 bytes per parameter in float32). Shared (tied)
    parameters appear once, as in ``model.named_parameters()``.
    """

    __slots__ = ("_tensors", "step")

    def __init__(self, tensors: Mapping[str, torch.Tensor], step: Optional[int] = None):
        object.__setattr__(self, "_tensors", MappingProxyType(dict(tensors)))
        object.__setattr__(self, "step", step)

    def __setattr__(self, name, value):
        raise AttributeError("ParameterSnapshot is immutable")

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        step: Optional[int] = None,
        trainable_only: bool = False,
    ) -> "ParameterSnapshot":
        """Copy every parameter of ``model`` (detached) to ``device``/``dtype``; with ``trainable_only``
        only those with ``requires_grad`` (a frozen base model under adapters is not copied)."""
        dtype = resolve_dtype(dtype)
        tensors = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if trainable_only and not param.requires_grad:
                    continue
                copy = param.detach().to(device=device, dtype=dtype, copy=True)
                tensors[name] = copy
        return cls(tensors, step=step)

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Read-only mapping name -> tensor."""
        return self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self._tensors.items()}


def check_same_parameters(old: ParameterSnapshot, new: ParameterSnapshot) -> None:
    """Raise ``ParameterSetMismatch`` naming what was added, removed or reshaped."""
    old_shapes, new_shapes = old.shapes(), new.shapes()
    if old_shapes == new_shapes:
        return
    added = sorted(set(new_shapes) - set(old_shapes))
    removed = sorted(set(old_shapes) - set(new_shapes))
    reshaped = sorted(n for n in set(old_shapes) & set(new_shapes) if old_shapes[n] != new_shapes[n])
    parts = []
    for label, names in (("added", added), ("removed", removed), ("reshaped", reshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            parts.append(f"{label}: {shown}")
    raise ParameterSetMismatch("parameter set changed between snapshots; " + "; ".join(parts))


@dataclass(frozen=True)
class TensorStats:
    """Sufficient statistics of one tensor Δ_p of n elements, from one sweep over it.

    ``total`` = Σ Δ, ``abs_total`` = Σ |Δ|, ``sq_total`` = Σ Δ², ``abs_max`` = max |Δ|,
    ``m2`` = Σ (Δ − mean_p)² (from ``torch.var_mean``), ``at_most[k]`` = #{|Δ| ≤ thresholds[k]}.
    Reductions run in the tensor's dtype (torch's pairwise summation); groups combine in float64.
    """

    numel: int
    total: float
    abs_total: float
    sq_total: float
    abs_max: float
    m2: float
    at_most: Tuple[int, ...]

    @classmethod
    def of(cls, delta: torch.Tensor, thresholds: Sequence[float] = ()) -> "TensorStats":
        n = delta.numel()
        if n == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, tuple(0 for _ in thresholds))
        flat = delta.reshape(-1)
        magnitude = flat.abs()
        var, _ = torch.var_mean(flat, correction=0)
        low, high = torch.aminmax(flat)
        return cls(
            numel=n,
            total=float(flat.sum()),
            abs_total=float(magnitude.sum()),
            sq_total=float(torch.dot(flat, flat)),
            abs_max=max(-float(low), float(high)),
            m2=float(var) * n,
            at_most=tuple(int(torch.count_nonzero(magnitude <= t)) for t in thresholds),
        )


def combine_std(stats: Iterable[TensorStats]) -> float:
    """Bessel-corrected std of the union of groups (Chan et al.):
    M2 = Σ_p [m2_p + n_p (mean_p − mean)²], std = sqrt(M2 / (N − 1))."""
    stats = [s for s in stats if s.numel]
    n = sum(s.numel for s in stats)
    if n < 2:
        return 0.0
    mean = sum(s.total for s in stats) / n
    m2 = sum(s.m2 + s.numel * (s.total / s.numel - mean) ** 2 for s in stats)
    return math.sqrt(max(m2, 0.0) / (n - 1))


class ParameterDelta:
    """Δ = W_new − W_old per parameter, computed in the snapshots' dtype, with global statistics.

    Statistics over all N = Σ_p numel(Δ_p) elements, from one sweep per tensor (``TensorStats``):

    - ``norm_l2`` = sqrt(Σ Δ²), ``norm_l1`` = Σ |Δ|, ``norm_max`` = max |Δ|
    - ``mean`` = Σ Δ / N, ``std`` = sqrt(Σ (Δ − mean)² / (N − 1)) (Bessel-corrected, as ``torch.std``)
    - ``count_at_most(t)`` = #{|Δ| ≤ t}; ``sparsity(t)`` = count_at_most(t) / N
    """

    __slots__ = ("_deltas", "old_step", "new_step", "__dict__")

    def __init__(self, deltas: Mapping[str, torch.Tensor], old_step=None, new_step=None):
        object.__setattr__(self, "_deltas", MappingProxyType(dict(deltas)))
        object.__setattr__(self, "old_step", old_step)
        object.__setattr__(self, "new_step", new_step)
        self.__dict__["_stats_cache"] = {}

    def __setattr__(self, name, value):
        raise AttributeError("ParameterDelta is immutable")

    @classmethod
    def between(cls, old: ParameterSnapshot, new: ParameterSnapshot) -> "ParameterDelta":
        """Δ = new − old; raises ``ParameterSetMismatch`` if names or shapes differ."""
        check_same_parameters(old, new)
        deltas = {name: new[name] - old[name].to(new[name].dtype) for name in new}
        return cls(deltas, old_step=old.step, new_step=new.step)

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self._deltas

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._deltas[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def items(self):
        return self._deltas.items()

    def tensor_stats(self, thresholds: Sequence[float] = ()) -> Dict[str, TensorStats]:
        """``TensorStats`` of every tensor with counts at ``thresholds`` (cached per thresholds)."""
        key = tuple(float(t) for t in thresholds)
        cache = self.__dict__["_stats_cache"]
        if key not in cache:
            cache[key] = {name: TensorStats.of(d, key) for name, d in self._deltas.items()}
        return cache[key]

    def _stats(self) -> Iterable[TensorStats]:
        cache = self.__dict__["_stats_cache"]
        return (cache[next(iter(cache))] if cache else self.tensor_stats()).values()

    @cached_property
    def numel(self) -> int:
        return sum(d.numel() for d in self._deltas.values())

    @cached_property
    def norm_l2(self) -> float:
        return math.sqrt(sum(s.sq_total for s in self._stats()))

    @cached_property
    def norm_l1(self) -> float:
        return float(sum(s.abs_total for s in self._stats()))

    @cached_property
    def norm_max(self) -> float:
        return max((s.abs_max for s in self._stats()), default=0.0)

    @cached_property
    def mean(self) -> float:
        return sum(s.total for s in self._stats()) / max(self.numel, 1)

    @cached_property
    def std(self) -> float:
        return combine_std(self._stats())

    def count_at_most(self, threshold: float) -> int:
        """#{elements with |Δ| ≤ threshold}; free after ``tensor_stats`` with that threshold."""
        for key, stats in self.__dict__["_stats_cache"].items():
            if float(threshold) in key:
                index = key.index(float(threshold))
                return sum(s.at_most[index] for s in stats.values())
        return sum(int(torch.count_nonzero(d.abs() <= threshold)) for d in self._deltas.values())

    def sparsity(self, threshold: float) -> float:
        """Fraction of elements with |Δ| ≤ threshold (1.0 for an empty delta)."""
        return self.count_at_most(threshold) / self.numel if self.numel else 1.0
