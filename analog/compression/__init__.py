"""Compression of per-sample logs: LoGra (Kronecker low-rank) and dense random projection."""

from analog.compression import dense, logra  # noqa: F401  (register the built-in projectors)
from analog.compression.base import Projector, build_projector, rank_for

__all__ = ["Projector", "build_projector", "rank_for"]
