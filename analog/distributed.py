"""Rank and world helpers on torch.distributed; everything is a no-op without a process group.

Every collective step of analog starts with ``step``'s one gather (the step's name, the rank's failure, its
settings), so that ranks whose paths diverged (one failed, or went to another step) meet there and raise
the same RankError, instead of waiting in reductions of different shapes until the group's timeout.

Reductions run on the process group's backend (gloo on CPU, NCCL on GPU): tensors are moved to
the device that backend needs and back, and nothing calls ``.cuda()`` unless the backend is NCCL.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

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
    """A collective step that cannot go on, raised alike on every rank (see ``step``): some ranks failed
    (an error of their own part of the step, or one propagating through the call), were at another step,
    or disagree on settings that must agree."""


def step(what: str, value: Any = None, failure: Optional[str] = None, agree: Optional[Dict[str, Any]] = None,
         changed: Sequence[str] = ()) -> List[Any]:
    """The one collective of an analog step ``what`` (e.g. ``"finalize()"``) that every other collective
    step meets: a single all_gather_object of (``what``, ``failure``, ``agree``, ``changed``, ``value``)
    from every rank; returns the ``value`` of every rank, in rank order.

    Every rank decides from the same gathered records, so all raise the same RankError, at once:

    * some rank reports a ``failure`` (its error, as text): "<what> failed on rank r (<failure>)",
      every failed rank named;
    * ranks are at different steps (rank 0 in ``new_segment()``, rank 1 in ``finalize()``): each rank's
      step is named;
    * the ``agree`` dicts ({setting: value}; None: nothing to compare) differ: each differing key with
      every rank's value, and which ranks had set it themselves (``changed``: e.g. by ``update()``).

    Since every collective step of analog starts with this gather, a rank's first collective after it
    failed or went elsewhere meets its peers' next one, whatever those are, instead of a reduction of
    another shape. Cost: one all_gather_object of a few hundred bytes per step (none per batch); the
    steps that gathered anyway (finalize's close barrier, new_segment, the pass check) gather this instead.
    Without a process group it returns ``[value]``."""
    if not is_distributed():
        return [value]
    records = all_gather_object((what, failure, agree, sorted(changed), value))
    steps = [r[0] for r in records]
    same = len(set(steps)) == 1
    where = ", ".join(f"rank {r}: {s}" for r, s in enumerate(steps))
    failed = [f"rank {r} ({rec[1]})" for r, rec in enumerate(records) if rec[1] is not None]
    if failed:
        raise RankError(f"{what if same else 'a collective step'} failed on {'; '.join(failed)}"
                        + ("" if same else f" (ranks at different steps: {where})"))
    differ = _differences([r[2] for r in records], [r[3] for r in records])
    if not same:
        raise RankError(f"ranks are at different collective steps ({where}): every rank must make analog's "
                        "collective calls (watch, update of a fixed setting after watch, next_pass, new_segment, "
                        "finalize/eval, refit, distributed scoring) alike and in the same order"
                        + (f"; they also disagree on settings that must agree: {differ}" if differ else ""))
    if differ:
        raise RankError(f"ranks disagree at {what} on settings that must agree: {differ}")
    return [r[4] for r in records]


def _differences(settings: List[Optional[Dict[str, Any]]], changed: List[List[str]]) -> str:
    """The keys on which the ranks' ``settings`` differ, each with every rank's value (and the ranks that
    set it themselves); '' when they agree."""
    if any(s is None for s in settings):  # a step that compares no settings (only where steps differ)
        return ""
    keys = [k for k in dict.fromkeys(k for s in settings for k in s)
            if any(s.get(k) != settings[0].get(k) for s in settings)]
    parts = []
    for key in keys:
        values = ", ".join(f"rank {r}: {s.get(key)!r}" for r, s in enumerate(settings))
        setters = [r for r, c in enumerate(changed) if key in c]
        by = (f" (set by update() on rank{'s' if len(setters) > 1 else ''} {', '.join(map(str, setters))})"
              if setters else "")
        parts.append(f"{key}: {values}{by}")
    return "; ".join(parts)


def describe(error: BaseException) -> str:
    """``Type: message`` of an error, as RankError names it."""
    return f"{type(error).__name__}: {error}"


def local_step(what: str, fn: Callable[[], _T], failure: Optional[str] = None,
               agree: Optional[Dict[str, Any]] = None, changed: Sequence[str] = ()) -> _T:
    """``fn()``, this rank's own part of a collective operation (e.g. reading its share of the store),
    then one collective (``step``): when ``fn`` raised an Exception on any rank (or a rank came with a
    ``failure`` of its own), every rank raises the same RankError naming ``what``, each rank that failed
    and its error (chained to this rank's own, if any), instead of its peers waiting alone in the
    reduction that follows; ``agree``/``changed`` as for ``step``. Without a process group ``fn``'s error
    propagates as it is."""
    if not is_distributed():
        return fn()
    error, result = None, None
    if failure is None:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - any error, reported on every rank
            error, failure = e, describe(e)
    try:
        step(what, failure=failure, agree=agree, changed=changed)
    except RankError as e:
        raise e from error
    return result


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def check_same(what: str, value: Any, step_name: Optional[str] = None, failure: Optional[str] = None,
               agree: Optional[Dict[str, Any]] = None, changed: Sequence[str] = ()) -> None:
    """Raise on every rank when ranks disagree on ``value`` (module set, projection, ...); the gather is
    the collective ``step`` named ``step_name`` (default ``what``), carrying ``failure``/``agree``/``changed``."""
    values = step(step_name or what, value, failure, agree, changed)
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
