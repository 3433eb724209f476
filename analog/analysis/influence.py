"""Influence functions over logged gradients.

For a query q and a training example t, with per-module logged gradients g and the fitted
curvature F̂ (block-diagonal over modules, damping λ as configured):

    dot:     s(q, t) = Σ_m g_{q,m}ᵀ (F̂_m + λI)⁻¹ g_{t,m}
    cosine:  s(q, t) / sqrt(s(q, q) · s(t, t))
    l2:      −(s(q, q) + s(t, t) − 2 s(q, t))   (negative squared H⁻¹-distance; higher = closer)

Positive ``dot`` scores mean up-weighting t lowers the loss on q (t helps q). Queries are
preconditioned once; training logs stream from the store chunk by chunk and meet the queries in
one matrix multiply per chunk. Self-influence is s(t, t).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from analog.analysis.results import InfluenceScores, TokenInfluence, TopKInfluence
from analog.hessian import CurvatureError

MODES = ("dot", "cosine", "l2")


class InfluenceFunction:
    """Influence scores from a fitted curvature and a log store.

    ``InfluenceFunction(analog)`` — what ``analog.add_analysis({"influence": InfluenceFunction})``
    builds — reads the curvature, the store, the damping and the progress setting from the AnaLog
    at each call (``finalize`` and ``update`` may change them). ``InfluenceFunction.from_parts(
    curvature, store, damping=None, progress=False)`` needs no AnaLog: any fitted curvature and any
    store (a LogStore, or None to score only logs passed in) will do.
    """

    def __init__(self, analog=None, *, curvature=None, store=None, damping: Optional[float] = None,
                 progress: bool = False):
        if analog is None and curvature is None:
            raise ValueError("InfluenceFunction needs an AnaLog, or a curvature (InfluenceFunction.from_parts)")
        self.analog = analog
        self._parts = {"curvature": curvature, "store": store, "damping": check_damping(damping),
                       "progress": bool(progress)}

    @classmethod
    def from_parts(cls, curvature, store=None, damping: Optional[float] = None,
                   progress: bool = False) -> "InfluenceFunction":
        return cls(curvature=curvature, store=store, damping=damping, progress=progress)

    # -- what it is built from --------------------------------------------------------------
    @property
    def curvature(self):
        return self.analog.curvature if self.analog is not None else self._parts["curvature"]

    @property
    def damping(self) -> Optional[float]:
        return self.analog.config.damping if self.analog is not None else self._parts["damping"]

    @property
    def progress(self) -> bool:
        return self.analog.progress if self.analog is not None else self._parts["progress"]

    def _store(self):
        store = self.analog.open_store() if self.analog is not None else self._parts["store"]
        if store is None:
            raise ValueError("this InfluenceFunction has no log store: pass log_loader=..., or build it "
                             "with InfluenceFunction.from_parts(curvature, store)")
        return store

    def _loader(self, log_loader):
        """``log_loader``, or one over the whole store after checking the curvature was fitted on it."""
        from analog.storage import build_log_dataloader

        if log_loader is not None:
            return log_loader
        return build_log_dataloader(self._own_store())

    def _own_store(self):
        """The store to score when no loader is given, after checking the curvature was fitted on it: the
        project's own store must be the one its curvature was fitted on; a store handed to from_parts may
        be another one on purpose (e.g. scoring an evaluation store)."""
        self._check_ready()
        store = self._store()
        fitted_on = self.curvature.meta.get("fitted_on")
        if self.analog is not None and fitted_on is not None and fitted_on != store.digest():
            raise CurvatureError(f"the store {store.path} changed since the {self.curvature.kind} curvature was fitted "
                                 "on it: call analog.refit() (or finalize()) before scoring against it")
        return store

    def _check_ready(self) -> None:
        """Queries need a fitted curvature: refuse them before ``finalize()`` (the store may also miss rows)."""
        curvature = self.curvature
        if curvature is None and self.analog is not None and not self.analog.modules:
            # watch() loads the project's curvature and projection: without it finalize()/eval() have none
            raise CurvatureError(
                f"AnaLog {self.analog.project!r} watches no module, so it has no curvature to query (eval() and "
                f"finalize() load or fit it only for watched modules): call analog.watch(model) first "
                f"(the project's modules: {_project_modules(self.analog)}), then analog.eval()")
        if curvature is None:
            raise CurvatureError("no curvature is fitted yet: call analog.finalize() (or analog.eval()) after "
                                 "logging, before influence queries")
        if not curvature.meta["finalized"]:
            raise CurvatureError(f"the logs are not finalized: the {curvature.kind!r} curvature is not fitted yet "
                                 "(and the store may miss rows); call analog.finalize() (or analog.eval()) after "
                                 "logging, before influence queries")

    def _grads(self, log, what: str) -> Tuple[List[Any], Dict[str, torch.Tensor]]:
        ids, logs = log
        grads = {m: kinds["grad"] for m, kinds in logs.items() if "grad" in kinds}
        if not grads:
            raise ValueError(f"the {what} log holds no gradients; log with update({{'log': ['grad']}})")
        return list(ids), grads

    @staticmethod
    def _check_match(query: Dict[str, torch.Tensor], train_shapes: Dict[str, tuple]) -> None:
        """Query gradients must have the training logs' modules and per-example shapes."""
        if sorted(query) != sorted(train_shapes):
            raise ValueError(f"query log modules {sorted(query)} differ from training log modules "
                             f"{sorted(train_shapes)}")
        for m in query:
            if tuple(query[m].shape[1:]) != tuple(train_shapes[m]):
                raise ValueError(
                    f"module {m!r}: query gradients have shape {tuple(query[m].shape[1:])} but training "
                    f"gradients {tuple(train_shapes[m])}; they were logged with different projections")

    @staticmethod
    def _shapes(grads: Dict[str, torch.Tensor]) -> Dict[str, tuple]:
        return {m: tuple(g.shape[1:]) for m, g in grads.items()}

    @staticmethod
    def _store_shapes(log_loader) -> Optional[Dict[str, tuple]]:
        store = getattr(getattr(log_loader, "dataset", None), "store", None)
        if store is None:
            return None
        return {f["module"]: tuple(f["shape"]) for f in store.fields if f["kind"] == "grad"}

    def precondition(self, grads: Dict[str, torch.Tensor], damping=None) -> Dict[str, torch.Tensor]:
        """{m: (F̂_m + λI)⁻¹ g_m} flattened to (B, D_m), float32."""
        self._check_ready()
        damping = self.damping if damping is None else check_damping(damping)
        out = {}
        for m, g in grads.items():
            try:
                pre = self.curvature.precondition(m, g.float(), damping)
            except RuntimeError as e:  # a shape that does not fit the fitted blocks
                raise ValueError(f"module {m!r}: gradients of shape {tuple(g.shape[1:])} do not fit the "
                                 f"{self.curvature.kind} curvature fitted on the logs ({e}); were they logged with "
                                 "another model, module set or projection?") from None
            out[m] = pre.reshape(g.shape[0], -1).float()
        return out

    @staticmethod
    def _flat(grads: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
        return {m: g.reshape(g.shape[0], -1).to(device, torch.float32) for m, g in grads.items()}

    def _self_scores(self, grads, damping) -> torch.Tensor:
        return self._dot_self(self.precondition(grads, damping), grads)

    def _dot_self(self, pre: Dict[str, torch.Tensor], grads) -> torch.Tensor:
        """s(x, x) = Σ_m (F̂_m + λI)⁻¹ g_m · g_m from preconditioned and raw gradients."""
        flat = self._flat(grads, next(iter(pre.values())).device)
        return sum((pre[m] * flat[m]).sum(1) for m in pre)

    def _pairwise(self, pre_q, train, mode, q_self, damping, per_module: bool):
        flat = self._flat(train, next(iter(pre_q.values())).device)
        parts = {m: pre_q[m] @ flat[m].T for m in pre_q}
        dot = sum(parts.values())
        if mode == "dot":
            return dot, parts if per_module else {}
        t_self = self._self_scores(train, damping).to(dot.device)
        if mode == "cosine":
            return dot / (q_self[:, None] * t_self[None, :]).clamp_min(1e-30).sqrt(), {}
        return -(q_self[:, None] + t_self[None, :] - 2 * dot), {}

    def _prepare(self, query_log, mode, damping, train_shapes=None, per_module=False, topk=None):
        if mode not in MODES:
            raise ValueError(f"unknown influence mode {mode!r}; choose from {MODES}")
        if per_module and (mode != "dot" or topk is not None):
            raise ValueError("per_module=True splits dot scores of the full matrix: use mode='dot' without topk")
        q_ids, q = self._grads(query_log, "query")
        if train_shapes is not None:
            self._check_match(q, train_shapes)
        pre_q = self.precondition(q, damping)
        q_self = None if mode == "dot" else self._dot_self(pre_q, q)
        return q_ids, q, pre_q, q_self

    # -- public API -------------------------------------------------------------------------
    def compute_influence(self, query_log, train_log, mode: str = "dot", damping: Optional[float] = None,
                          per_module: bool = False) -> InfluenceScores:
        """Scores of every query against every example of ``train_log`` (one batch in memory)."""
        t_ids, t = self._grads(train_log, "training")
        q_ids, q, pre_q, q_self = self._prepare(query_log, mode, damping, self._shapes(t), per_module)
        scores, parts = self._pairwise(pre_q, t, mode, q_self, damping, per_module)
        return InfluenceScores(scores.cpu(), q_ids, t_ids, {m: p.cpu() for m, p in parts.items()})

    def compute_influence_all(self, query_log, log_loader=None, mode: str = "dot",
                              damping: Optional[float] = None, per_module: bool = False,
                              topk: Optional[int] = None, progress: Optional[bool] = None,
                              distributed: bool = False):
        """Scores of the queries against the whole store; ``topk=k`` keeps only k best/worst per query.

        ``distributed=True`` (collective: every rank calls it with the same queries): each rank scores
        a contiguous share of the training logs (of ``log_loader``'s store range, or of the whole
        store) and every rank gets the gathered result — the full matrix, or the top-k merged across
        ranks — equal to the single-process one; a rank whose share is empty adds nothing, and an error
        in any rank's share is raised on every rank (a RankError naming the ranks and their errors).
        Without a process group it is the plain call.
        """
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk must be a positive integer (the number of best and worst kept), got {topk!r}")
        args = (query_log, mode, damping, per_module, topk, progress)
        if distributed:
            from analog.distributed import local_step

            def share():
                loader, offset = self._shard_loader(log_loader)
                return self._score(loader, offset, *args)

            # every rank scores with the same settings; a rank calling this while an error propagates (a failed
            # query block) stops every rank here (analog.AnaLog._in_flight)
            agree = {"damping": self.damping if damping is None else damping, "mode": mode, "topk": topk,
                     "per_module": per_module}
            failure = self.analog._in_flight("compute_influence_all()") if self.analog is not None else None
            changed = self.analog._changed if self.analog is not None else ()
            return self._gather(*local_step("scoring a share of the store", share, failure, agree, changed), topk)
        q_ids, train_ids, chunks, parts_all, best = self._score(log_loader, 0, *args)
        if not train_ids:
            raise ValueError("the training log loader yielded no examples")
        if topk is not None:
            return _topk_result(best, q_ids, train_ids)
        return InfluenceScores(torch.cat(chunks, 1), q_ids, train_ids,
                               {m: torch.cat(p, 1) for m, p in parts_all.items()})

    def _score(self, log_loader, offset, query_log, mode, damping, per_module, topk, progress):
        """(query ids, training ids, score chunks, per-module chunks, top-k so far) of ``log_loader``'s
        logs; ``offset``: the position of its first row in the range scored (for top-k positions)."""
        from tqdm.auto import tqdm

        self._check_ready()
        log_loader = self._loader(log_loader)
        q_ids, q, pre_q, q_self = self._prepare(query_log, mode, damping, self._store_shapes(log_loader),
                                                per_module, topk)
        chunks, parts_all, train_ids = [], {}, []
        best = None
        show = self.progress if progress is None else progress
        for batch in tqdm(log_loader, desc="influence", disable=not show, leave=False):
            t_ids, t = self._grads(batch, "training")
            self._check_match(q, self._shapes(t))
            scores, parts = self._pairwise(pre_q, t, mode, q_self, damping, per_module)
            if topk is None:
                chunks.append(scores.cpu())
                for m, p in parts.items():
                    parts_all.setdefault(m, []).append(p.cpu())
            else:
                best = _merge_topk(best, scores.cpu(), offset + len(train_ids), topk)
            train_ids.extend(t_ids)
        return q_ids, train_ids, chunks, parts_all, best

    def _shard_loader(self, log_loader):
        """(this rank's loader over its contiguous share, the share's first position in the full range)."""
        from analog.distributed import shard_range
        from analog.storage import build_log_dataloader
        from analog.storage.dataset import LogBatches

        if log_loader is None:
            store, batch_size, workers, lo, hi = self._own_store(), 256, 0, 0, None
        else:
            dataset = getattr(log_loader, "dataset", None)
            if not isinstance(dataset, LogBatches):
                raise ValueError("distributed=True shards the store itself: pass log_loader=None or a loader "
                                 "from analog.build_log_dataloader / analog.storage.build_log_dataloader")
            store, batch_size, workers = dataset.store, dataset.batch_size, log_loader.num_workers
            lo, hi = dataset.start, dataset.stop
        hi = len(store) if hi is None else hi
        start, stop = shard_range(hi - lo)
        return build_log_dataloader(store, batch_size, workers, lo + start, lo + stop), start

    @staticmethod
    def _gather(q_ids, train_ids, chunks, parts_all, best, topk):
        """Every rank's share, in rank order: the full matrix, or the top-k merged across ranks."""
        from analog.distributed import all_gather_object

        if topk is None:
            local = (torch.cat(chunks, 1) if chunks else torch.zeros(len(q_ids), 0),
                     {m: torch.cat(p, 1) for m, p in parts_all.items()}, train_ids)
        else:
            local = (best, train_ids)
        gathered = all_gather_object(local)
        train_ids = [i for g in gathered for i in g[-1]]
        if not train_ids:
            raise ValueError("the training log loader yielded no examples")
        if topk is not None:
            merged = None
            for b, _ in gathered:
                if b is not None:
                    merged = _combine_topk(merged, b, topk)
            return _topk_result(merged, q_ids, train_ids)
        scores = torch.cat([g[0] for g in gathered], 1)
        modules = dict.fromkeys(m for g in gathered for m in g[1])
        per_module = {m: torch.cat([g[1][m] for g in gathered if m in g[1]], 1) for m in modules}
        return InfluenceScores(scores, q_ids, train_ids, per_module)

    def compute_token_influence(self, query_log, log_loader=None, damping: Optional[float] = None,
                                progress: Optional[bool] = None) -> TokenInfluence:
        """Per-position dot scores s(q_t, train) of a query log made with ``analog(per_token=True)``.

        ``scores[i, t, j]`` = g_{q_i,t}ᵀ (F̂ + λI)⁻¹ g_j, where g_{q_i,t} = δ̃_t ã_tᵀ is position t's
        share of query i's gradient; summing over t gives ``compute_influence_all``'s dot score.
        """
        from tqdm.auto import tqdm

        q_ids, logs = query_log
        tokens = {m: kinds["token_grad"] for m, kinds in logs.items() if "token_grad" in kinds}
        if not tokens:
            raise ValueError("the query log has no per-token gradients; log it inside analog(per_token=True)")
        b, t = next(iter(tokens.values())).shape[:2]
        uneven = {m: tuple(g.shape[:2]) for m, g in tokens.items() if g.shape[:2] != (b, t)}
        if uneven:
            raise ValueError(f"per-token scores need the same positions in every module; {(b, t)} vs {uneven}")
        flat = {m: g.reshape(b * t, *g.shape[2:]) for m, g in tokens.items()}
        self._check_ready()
        log_loader = self._loader(log_loader)
        shapes = self._store_shapes(log_loader)
        if shapes is not None:
            self._check_match(flat, shapes)
        pre = self.precondition(flat, damping)
        chunks, train_ids = [], []
        show = self.progress if progress is None else progress
        for batch in tqdm(log_loader, desc="token influence", disable=not show, leave=False):
            ids, grads = self._grads(batch, "training")
            self._check_match(flat, self._shapes(grads))
            train = self._flat(grads, next(iter(pre.values())).device)
            chunks.append(sum(pre[m] @ train[m].T for m in pre).reshape(b, t, -1).cpu())
            train_ids.extend(ids)
        if not chunks:
            raise ValueError("the training log loader yielded no examples")
        return TokenInfluence(torch.cat(chunks, 2), list(q_ids), train_ids)

    def compute_self_influence(self, log_or_loader, damping: Optional[float] = None):
        """s(t, t) for a log batch (returns a tensor) or a loader (returns (ids, tensor))."""
        if isinstance(log_or_loader, tuple):
            _, g = self._grads(log_or_loader, "self-influence")
            return self._self_scores(g, damping).cpu()
        self._check_ready()  # before reading the loader: before finalize() the store may be empty or partial
        ids, values = [], []
        for batch in log_or_loader:
            b_ids, g = self._grads(batch, "self-influence")
            ids.extend(b_ids)
            values.append(self._self_scores(g, damping).cpu())
        if not values:
            store = getattr(getattr(log_or_loader, "dataset", None), "store", None)
            where = f" (store {store.path} holds {len(store)} examples)" if store is not None else ""
            raise ValueError(f"the log loader yielded no batches{where}: nothing to score; log training data "
                             "inside `with analog(data_id=...)` and call analog.finalize() first")
        return ids, torch.cat(values)


def _project_modules(analog) -> str:
    """The modules the project's store holds, for an error message (or why they are unknown)."""
    from analog.storage import LogStore

    try:
        return str(LogStore(analog.log_path).modules)
    except Exception:  # noqa: BLE001 - only for the message: no store, or one that cannot be read
        return f"unknown, no readable store at {analog.log_path}"


def check_damping(damping: Any) -> Optional[float]:
    """``damping`` if it is None or a finite number >= 0; a ValueError naming it otherwise."""
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be a finite number >= 0 or None (0.1 × mean eigenvalue), got {damping!r}")
    return float(damping)


def _merge_topk(best, scores: torch.Tensor, offset: int, k: int):
    """Running top-k (largest and smallest) per row of a new chunk of columns starting at ``offset``."""
    pos = torch.arange(offset, offset + scores.shape[1]).expand(scores.shape[0], -1)
    chunk = (scores, pos, scores, pos)
    return _combine_topk(best, chunk, k)


def _combine_topk(a, b, k: int):
    """Top-k of two (high values, high positions, low values, low positions) results; ``a`` may be None."""
    if a is not None:
        b = tuple(torch.cat([x, y], 1) for x, y in zip(a, b))
    hv, hi, lv, li = b
    kk = min(k, hv.shape[1])
    hv, h = hv.topk(kk, dim=1)
    lv, low = lv.topk(kk, dim=1, largest=False)
    return hv, hi.gather(1, h), lv, li.gather(1, low)


def _topk_result(best, q_ids, train_ids) -> TopKInfluence:
    hv, hi, lv, li = best
    return TopKInfluence(
        query_ids=q_ids,
        helpful_ids=[[train_ids[j] for j in row] for row in hi.tolist()],
        helpful_scores=hv,
        harmful_ids=[[train_ids[j] for j in row] for row in li.tolist()],
        harmful_scores=lv,
        n_train=len(train_ids),
    )
