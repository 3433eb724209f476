"""Rank and world helpers on torch.distributed; everything is a no-op without a process group.

Reductions run on the process group's backend (gloo on CPU, NCCL on GPU): tensors are moved to
the device that backend needs and back, and nothing calls ``.cuda()`` unless the backend is NCCL.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

_T = TypeVar("_T")


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


def total(n: int) -> int:
    """Σ over ranks of the integer ``n`` (collective; ``n`` itself without a process group)."""
    if not is_distributed():
        return int(n)
    return int(all_reduce_sum(torch.tensor(float(n), dtype=torch.float64)).item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (collective; ``flag`` itself without a process group)."""
    return total(1 if flag else 0) > 0


class RankError(RuntimeError):
    """An error some ranks raised in a step of their own, raised on every rank (see ``local_step``)."""


def local_step(what: str, fn: Callable[[], _T]) -> _T:
    """``fn()``, this rank's own part of a collective operation (e.g. reading its share of the store),
    then one collective: when ``fn`` raised an Exception on any rank, every rank raises the same
    RankError naming ``what``, each rank that failed and its error (chained to this rank's own, if
    any), instead of its peers waiting alone in the reduction that follows. Without a process group
    ``fn``'s error propagates as it is."""
    if not is_distributed():
        return fn()
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - any error, reported on every rank
        error = e
    messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = [f"rank {r} ({m})" for r, m in enumerate(messages) if m is not None]
    if failed:
        raise RankError(f"{what} failed on {'; '.join(failed)}") from error
    return result


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def check_same(what: str, value: Any) -> None:
    """Raise on every rank when ranks disagree on ``value`` (module set, projection, ...)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        if all(isinstance(v, dict) for v in values):  # name only the entries that differ
            keys = [k for k in dict.fromkeys(k for v in values for k in v) if any(v.get(k) != values[0].get(k)
                                                                                 for v in values)]
            values = [{k: v.get(k) for k in keys} for v in values]
        details = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise RuntimeError(f"processes disagree on {what}: {details}")


def broadcast_tensors(tensors: Dict[str, torch.Tensor], src: int = 0) -> Dict[str, torch.Tensor]:
    """Rank ``src``'s values of a dict of tensors (same keys, shapes and dtypes on every rank:
    ``check_same`` them first, or the collectives mismatch)."""
    if not is_distributed():
        return tensors
    return {k: broadcast(tensors[k], src).to(tensors[k].dtype) for k in sorted(tensors)}


def shard_range(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of ``n`` items (shares differ by at most one;
    concatenated in rank order they are 0..n)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (so module names carry no ``module.`` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model
