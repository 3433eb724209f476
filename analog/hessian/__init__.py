"""Hessian approximations: identity, diagonal, K-FAC, EK-FAC and raw (full block) curvature."""

from analog.hessian import auto, kfac, simple  # noqa: F401  (register the built-in kinds)
from analog.hessian.base import Curvature, CurvatureError, build_curvature, damping_value

__all__ = ["Curvature", "CurvatureError", "build_curvature", "damping_value"]
