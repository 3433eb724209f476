"""Projectors: how per-sample logs are compressed before they leave the device.

A projector acts at three points of the data path (shapes per module):

* ``project_activations``: layer input -> ã, (B, T, G, r_in)        [forward hook]
* ``project_output_grads``: δ (B, T, G, d_out) -> δ̃, (B, T, G, r_out) [backward hook]
* ``compress_grad``: per-sample Σ_t δ̃_t ã_tᵀ, (B, G, r_out, r_in) -> stored tensor (B, *grad_shape)

Projectors are registered by name with ``__init_subclass__(kind=...)`` and built from the
``compression`` section of the config. Their tensors are saved with safetensors (no pickle).
"""

from __future__ import annotations

import fnmatch
import zlib
from typing import ClassVar, Dict, Tuple, Type

import torch

_PROJECTORS: Dict[str, Type["Projector"]] = {}


def module_seed(seed: int, name: str) -> int:
    """A seed that depends only on (seed, module name): the same in every process and rank."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def rank_for(name: str, rank) -> Tuple[int, int]:
    """(r_out, r_in) for module ``name``.

    ``rank`` is an int (both sides), a pair [r_out, r_in], or a dict of glob patterns over module
    names to either (first match wins; key ``"default"`` matches every name).
    """
    if isinstance(rank, dict):
        for pattern, value in rank.items():
            if pattern != "default" and fnmatch.fnmatchcase(name, pattern):
                return rank_for(name, value)
        if "default" not in rank:
            raise KeyError(f"no compression rank for module {name!r}: add a pattern or a 'default' key")
        return rank_for(name, rank["default"])
    if isinstance(rank, (list, tuple)):
        r_out, r_in = rank
        return int(r_out), int(r_in)
    return int(rank), int(rank)


class Projector:
    """Base projector; the identity (no compression) is the ``"none"`` kind."""

    kind: ClassVar[str]

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            _PROJECTORS[kind] = cls

    def __init__(self, rank=64, seed: int = 0, init: str = "random", damping=None, allocate: str = "uniform"):
        self.rank, self.seed, self.init, self.damping, self.allocate = rank, int(seed), init, damping, allocate
        self.tensors: Dict[str, torch.Tensor] = {}
        self._device_cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, dims: Dict[str, Tuple[int, int, int]]) -> None:
        """Create projections for modules ``{name: (groups, d_out, d_in)}`` (no-op by default)."""

    def needs_fit(self) -> bool:
        """True when projections must be fitted from data before logging (LoGra ``init='pca'``)."""
        return False

    def grad_shape(self, name: str, dims: Tuple[int, int, int]) -> Tuple[int, ...]:
        groups, d_out, d_in = dims
        return (groups, d_out, d_in)

    def fingerprint(self) -> dict:
        """What a store remembers to refuse logs made with other projections."""
        digest = 0
        for key in sorted(self.tensors):
            digest = zlib.crc32(self.tensors[key].detach().cpu().contiguous().numpy().tobytes(), digest)
        out = {"kind": self.kind, "rank": self.rank, "seed": self.seed, "init": self.init, "crc32": digest}
        if self.damping is not None:
            out["damping"] = self.damping
        if self.allocate != "uniform":
            out["allocate"] = self.allocate
        return out

    def _on(self, key: str, device: torch.device) -> torch.Tensor:
        cached = self._device_cache.get((key, device))
        if cached is None:
            cached = self.tensors[key].to(device)
            self._device_cache[(key, device)] = cached
        return cached

    def load_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = {k: v.float() for k, v in tensors.items()}
        self._device_cache.clear()

    # -- data path --------------------------------------------------------------------------
    def project_activations(self, name, module, rule, x: torch.Tensor) -> torch.Tensor:
        return rule.activations(module, x)

    def project_output_grads(self, name, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def compress_grad(self, name, grad: torch.Tensor) -> torch.Tensor:
        return grad


class NoProjector(Projector, kind="none"):
    """Keep uncompressed per-sample gradients (G, d_out, d_in)."""


def build_projector(kind: str, **kwargs) -> Projector:
    if kind not in _PROJECTORS:
        raise ValueError(f"unknown compression type {kind!r}; known: {sorted(_PROJECTORS)}")
    return _PROJECTORS[kind](**kwargs)
