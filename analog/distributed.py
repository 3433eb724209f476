"""Rank and world helpers on torch.distributed; everything is a no-op without a process group.

Reductions run on the process group's backend (gloo on CPU, NCCL on GPU): tensors are moved to
the device that backend needs and back, and nothing calls ``.cuda()`` unless the backend is NCCL.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks (a new tensor; ``t`` is unchanged)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s value of ``t`` on every rank (a new tensor)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).clone()
    dist.broadcast(buf, src)
    return buf.to(t.device)


def all_gather_object(obj: Any) -> List[Any]:
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def check_same(what: str, value: Any) -> None:
    """Raise on every rank when ranks disagree on ``value`` (module set, projection, ...)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        details = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise RuntimeError(f"processes disagree on {what}: {details}")
