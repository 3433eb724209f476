"""Curvature (Hessian approximations) over logged per-sample gradients, one block per module.

Conventions (per module, gradients G of shape (G_groups, d_out, d_in) flattened row-major):

* the empirical Fisher is F = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ, N = number of logged examples;
* ``precondition(name, g)`` returns (F̂ + λI)⁻¹ g for the approximation F̂ of each kind;
* λ is explicit, or ``None`` for the heuristic 0.1 × mean eigenvalue of F̂ for that module;
* damping is applied to a copy at query time: fitted state is never changed by a query.

Statistics are collected in two places: Kronecker factor sums from the hooks while logging
(``batch_stats``: committed with each chunk of the store when logs are saved, ``absorb``-ed in
memory otherwise), and gradient statistics by one streaming read of the store. With a store, N and
every sum come from the store alone, so a run resumed after a crash fits what an uninterrupted one
would. ``finalize`` normalises once; calling it again changes nothing.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Dict, Iterable, List, Optional, Type

import torch

from analog.distributed import all_reduce_sum, local_step, rank, world_size

_KINDS: Dict[str, Type["Curvature"]] = {}
HEURISTIC_DAMPING = 0.1
DEFAULT_FIT_BYTES = 2**30  # config ``fit_bytes``: float64 sums held at once by a fit from the store
#: bytes a batch of rows read from the store for a fit may take (see ``batch_rows``): 256 MiB
DEFAULT_READ_BYTES = 2**28


class CurvatureError(RuntimeError):
    """Curvature that was not fitted, or does not match the logs it is applied to."""


def damping_value(eigenvalues: torch.Tensor, damping: Optional[float]) -> float:
    """λ: the explicit value, or 0.1 × mean(eigenvalues) when ``damping`` is None."""
    if damping is not None:
        return float(damping)
    return HEURISTIC_DAMPING * float(eigenvalues.double().mean())


class Curvature:
    """Base class; subclasses register with ``kind=`` and implement the hooks they need."""

    kind: ClassVar[str]
    needs_factors: ClassVar[bool] = False
    needs_store: ClassVar[bool] = False

    def __init_subclass__(cls, kind: Optional[str] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            _KINDS[kind] = cls

    def __init__(self):
        self.state: Dict[str, torch.Tensor] = {}
        self.meta: Dict[str, float] = {"n_samples": 0, "finalized": False}

    # -- collection -------------------------------------------------------------------------
    def batch_stats(self, observed) -> Dict[str, torch.Tensor]:
        """Sums over one batch's observed calls ``[(name, a, d, mask), ...]`` that this kind needs from
        the logging pass (K-FAC: factor sums); a stored batch commits them with its rows."""
        return {}

    def absorb(self, stats: Dict[str, torch.Tensor], n: int) -> None:
        """Add a batch's ``stats`` and its ``n`` examples in memory (logs not saved: no store to hold them)."""
        if self.meta["finalized"]:
            raise CurvatureError("curvature is already finalized; start a new project to log more")
        add_sums(self.state, stats)
        self.meta["n_samples"] += int(n)

    def finalize(self, store=None, progress: bool = False, fit_bytes: int = DEFAULT_FIT_BYTES) -> None:
        """Fit once. With a store (logs saved), the store is the one source: N = len(store), and
        statistics from the logging pass are the sums committed with its chunks (over every rank);
        ``meta["fitted_on"]`` records the store's digest. Without one, this process's in-memory
        statistics and count, summed over ranks. ``fit_bytes`` bounds the float64 sums a fit from
        the store holds at once (config ``fit_bytes``; see ``fit_groups``). Idempotent."""
        if self.meta["finalized"]:
            return
        if store is not None:
            self.meta["n_samples"] = len(store)
            self.meta["fitted_on"] = store.digest()
            if self.needs_factors:
                self.state = store.stat_sums()
        else:
            self.meta["n_samples"] = int(all_reduce_sum(torch.tensor(float(self.meta["n_samples"]))))
        self._finalize(store, progress, fit_bytes)
        self.meta["finalized"] = True

    def _finalize(self, store, progress: bool, fit_bytes: int) -> None:
        pass

    # -- queries ----------------------------------------------------------------------------
    def precondition(self, name: str, g: torch.Tensor, damping: Optional[float] = None) -> torch.Tensor:
        """(F̂ + λI)⁻¹ g for per-example gradients g of shape (B, *grad_shape)."""
        raise NotImplementedError

    def require(self, name: str, key: str) -> torch.Tensor:
        if not self.meta["finalized"]:
            raise CurvatureError(f"{self.kind} curvature is not fitted yet: log with analog, then call "
                                 "analog.finalize() (or analog.eval()) before querying")
        try:
            return self.state[f"{name}/{key}"]
        except KeyError:
            raise CurvatureError(f"{self.kind} curvature has no statistics for module {name!r}; "
                                 f"fitted modules: {self.modules()}") from None

    def modules(self):
        return sorted({k.rsplit("/", 1)[0] for k in self.state})

    def choices(self) -> Dict[str, str]:
        """{module: the kind its block was fitted with}: this kind for every module (``auto`` mixes kinds,
        analog.hessian.auto); also answers for a project reopened with ``hessian: True`` that keeps a
        saved ``kfac`` (see analog.state)."""
        return {name: self.kind for name in self.modules()}

    @staticmethod
    def load(directory) -> "Curvature":
        """The curvature saved in a project's ``state/`` directory (written by analog.state.ProjectState)."""
        from analog.state import read_curvature

        curvature = read_curvature(directory)
        if curvature is None:
            raise CurvatureError(f"no fitted curvature in {directory} (missing curvature.json): finalize() the run")
        return curvature


def add_sums(total: Dict[str, torch.Tensor], sums: Dict[str, torch.Tensor]) -> None:
    """``total[key] += sums[key]`` for every key (a key new to ``total`` is taken as it is)."""
    for key, value in sums.items():
        total[key] = value if key not in total else total[key] + value


def build_curvature(kind: str) -> Curvature:
    if kind not in _KINDS:
        raise ValueError(f"unknown hessian {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind]()


def grad_fields(store, modules: Optional[Iterable[str]] = None) -> List[int]:
    """Indices into ``store.fields`` of the ``grad`` fields of ``modules`` (default: every module that
    logged ``grad``), in store order; a module in ``modules`` with no ``grad`` in the store is skipped."""
    wanted = None if modules is None else set(modules)
    return [f for f, field in enumerate(store.fields)
            if field["kind"] == "grad" and (wanted is None or field["module"] in wanted)]


def batch_rows(store, fields: List[int], read_bytes: Optional[int] = None) -> int:
    """Rows a batch of ``store_batches`` reads at once: B = max(1, ⌊read_bytes / c⌋), c =
    ``store.read_cost(fields)`` the bytes one row costs read into float64 (analog.storage.reader)::

        c = Σ_f (8 · n_f + m_f)  +  w · max_f n_f

    over the wanted fields f of n_f values: their float64 values (8 · n_f, held together as the
    batch), the mapped bytes read (m_f = ``store.codec.read_bytes(f)``, page cache: n_f · 4 or 2 in a
    float store, 4 + the bytes holding its values in a quantised one) and the working memory of
    decoding one field at a time (w = ``store.codec.work_bytes``: 0 float, 4 int8, 5 int4, 16 int2).
    A batch then holds at most max(read_bytes, c) bytes, whatever the store's other fields (the
    consumer's own temporaries not counted); a row costing more than ``read_bytes`` is read alone.
    B depends only on the store's header (fields, dtype), ``fields`` and ``read_bytes`` (None:
    ``DEFAULT_READ_BYTES``), so every rank derives the same B from the same arguments. Every row
    when no field is wanted."""
    read_bytes = DEFAULT_READ_BYTES if read_bytes is None else read_bytes
    if isinstance(read_bytes, bool) or not isinstance(read_bytes, int) or read_bytes < 1:
        raise ValueError(f"read_bytes must be a positive number of bytes, got {read_bytes!r}")
    cost = store.read_cost(fields)
    return max(1, len(store)) if not cost else max(1, read_bytes // cost)


def store_batches(store, batch_size: Optional[int] = None, progress: bool = False, desc: str = "fitting curvature",
                  modules: Optional[Iterable[str]] = None, read_bytes: Optional[int] = None):
    """Yield {module: grad (B, D) float64} over this rank's share of the store (every batch when
    not distributed; batch i goes to rank i mod world otherwise), with an optional tqdm bar. Only
    the ``grad`` fields of ``modules`` (default: every module that logged ``grad``) are read, each
    decoded alone straight into its float64 batch (``store.field_rows``): other fields' bytes are
    never decoded. ``batch_size``: rows a batch (default: ``batch_rows`` under ``read_bytes``, the
    same on every rank; one given explicitly must be too). Nothing is yielded when no field is wanted."""
    from tqdm.auto import tqdm

    fields = grad_fields(store, modules)
    if not fields:
        return
    size = batch_rows(store, fields, read_bytes) if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1 row, got {batch_size!r}")
    starts = range(rank() * size, len(store), world_size() * size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        stop = min(start + size, len(store))
        yield {store.fields[f]["module"]: store.field_rows(start, stop, f, out=torch.empty(
            stop - start, store.codec.sizes[f], dtype=torch.float64)) for f in fields}


def share_sums(store, add, progress: bool = False, desc: str = "fitting curvature",
               modules: Optional[Iterable[str]] = None,
               read_bytes: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """{module: Σ over this rank's share of the store (see store_batches)}, of every logged module or of
    those in ``modules`` (only those are read, into float64, in batches under ``read_bytes``: the same
    value on every rank), accumulated batch by batch as
    ``total = add(module, total, g)`` (``total`` None at the module's first batch; ``add`` may add into
    it in place); a module of which it read no batch is absent. An error on any rank is raised on
    every rank (a RankError naming each rank that failed: analog.distributed.local_step), so none
    waits alone in ``reduce_sums``."""
    def local():
        sums: Dict[str, torch.Tensor] = {}
        for logs in store_batches(store, progress=progress, desc=desc, modules=modules, read_bytes=read_bytes):
            # each module's batch is taken out of ``logs`` as it is added, so none is held past its ``add``
            # (nor while the next batch is read: the loop variable would otherwise keep the last one)
            for name in list(logs):
                sums[name] = add(name, sums.get(name), logs.pop(name))
        return sums

    return local_step(desc, local)


def reduce_sums(sums: Dict[str, torch.Tensor], store, shape_of,
                modules: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Σ over ranks of per-module sums; a module this rank saw no batch of counts as zeros.

    Reduces the store's ``grad`` modules in the store's field order, restricted to ``modules`` when
    given: every rank must call it with the same ``modules`` (one all-reduce per module, matched by
    order). Each local sum is taken out of ``sums`` as it is reduced, so a group is held once."""
    wanted = None if modules is None else set(modules)
    out = {}
    for field in store.fields:
        if field["kind"] == "grad" and (wanted is None or field["module"] in wanted):
            name = field["module"]
            local = sums.pop(name, None)
            out[name] = all_reduce_sum(local if local is not None else torch.zeros(shape_of(name, field["shape"]),
                                                                                  dtype=torch.float64))
    return out


def fit_groups(sizes: Dict[str, int], budget: int, what: str) -> List[List[str]]:
    """Modules in the order of ``sizes`` ({module: bytes of its sums}), cut into consecutive groups
    whose bytes add up to at most ``budget``: one read of the store per group. A module larger
    than ``budget`` is a group of its own, with a warning naming it and its bytes. Deterministic,
    so every rank forms the same groups from the same store and budget."""
    groups: List[List[str]] = []
    held, oversized = 0, []  # held: bytes of the last group
    for name, size in sizes.items():
        if size > budget:
            oversized.append(f"{name!r} ({format_bytes(size)})")
        if groups and held + size <= budget:
            groups[-1].append(name)
            held += size
        else:
            groups.append([name])
            held = size
    if oversized:
        warnings.warn(f"{what}: the sums of module(s) {', '.join(oversized[:5])}"
                      f"{f' and {len(oversized) - 5} more' if len(oversized) > 5 else ''} exceed fit_bytes = "
                      f"{format_bytes(budget)}; each is fitted alone, in a read of the store of its own", stacklevel=4)
    return groups


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit not above it, and exactly: 134217728 -> '128.0 MiB = 134217728 bytes'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} = {n} bytes"
    return f"{n} bytes"
