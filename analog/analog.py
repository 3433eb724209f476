"""AnaLog: the facade of seed 004 — watch a model, log inside ``with`` blocks, analyse offline.

The end of logging (finalize, refit, is_logged, recovery of a dropped AnaLog) is in analog.fitting,
the segment glue (new_segment, at_segment) in analog.segmenting; the methods here delegate to them.

Project layout under ``root_dir/project/``: ``logs/`` (the log store, analog.storage.layout) and
``state/`` (config, projection, curvature), owned by analog.state.ProjectState: the facade reads
and writes them only through ``self.state``. Reopening a project reads its saved config back.

Distributed (torch.distributed initialised, world size > 1): every rank watches the same model
(a DistributedDataParallel wrapper is looked through: module names carry no ``module.`` prefix),
enters the logging ``with`` blocks for its own shard of the data (ids must be disjoint across
ranks; a shard may be empty in any pass) and calls ``next_pass``/``finalize``/``eval``: these are
collective, and a rank that saw no data adds zeros to their reductions. Projections are seeded and broadcast
from rank 0; the first logging block of each pass checks that all ranks watch the same modules with
the same projection (a clear error on every rank otherwise). Each rank appends to the one store
(see analog.storage.layout), ``finalize`` waits until every rank's chunks are on disk before the
curvature, reduced across ranks, reads it; rank 0 writes the state files.

Every collective step (watch, update of a fixed key after watch, a pass's first-block check, next_pass,
new_segment, finalize/eval, refit, distributed scoring) starts with one gather of (step, failure, settings)
(analog.distributed.step): a rank that calls it while an error propagates (``finally: finalize()`` after its
block failed), ranks at different steps, or ranks whose settings differ (``update()`` on one rank: every key
but PER_RANK_KEYS) raise the same RankError on every rank there, and the run stops (AnaLog._collective). A
peer waiting in another library's collective (DDP's gradient all-reduce inside the block) is out of reach:
log through the unwrapped model, or let the error end the process (see the README, Distributed).

Per-sample gradients are those of the loss the user backpropagates: with ``reduction="sum"`` the
logged gradient of example i is ∇θ ℓ_i; with ``reduction="mean"`` it is ∇θ ℓ_i / B (B = batch size),
which scales every score by 1/B² and mixes batch sizes — use ``"sum"``.
"""

from __future__ import annotations

import reprlib
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from analog import distributed, fitting, segmenting
from analog.capture.hooks import Capture
from analog.compression import build_projector
from analog.compression.base import NoProjector
from analog.compression.query import QueryGrams
from analog.compression.statistics import StatisticsPass
from analog.config import Config, given_values, load_config
from analog.hessian import Curvature, CurvatureError, build_curvature
from analog.ids import to_ids
from analog.state import RUNTIME_KEYS, ProjectError, ProjectState, flatten
from analog.storage import LogStore, LogWriter, build_log_dataloader
from analog.storage.encoding import QUANTISED_DTYPES, value_dtype
from analog.storage.rows import fields_of
from analog.storage.writer import NonFiniteBatch
from analog.trajectory import Trajectory
from analog.watch import watch_model

#: keys that may change once logging started in this process (they affect checks and queries only, and
#: fit_bytes the memory of the fit, not its result)
QUERY_TIME_KEYS = frozenset({"damping", "progress", "nonfinite", "fit_bytes"})

#: keys that may differ between ranks (torch.distributed): the others must agree at every collective step
#: (``AnaLog._agreed``). ``fit_bytes``: the smallest is used; ``damping`` is compared where it is used
#: across ranks, by distributed scoring; ``root_dir`` may be mounted at different paths on different hosts
PER_RANK_KEYS = frozenset({"root_dir", "progress", "fit_bytes", "damping", "storage.flush_bytes"})


class AnaLog:
    """Log per-sample gradients/activations of watched modules and analyse them."""

    def __init__(self, project: str, config=None):
        self.project = project
        self._given: Dict[str, Any] = dict(given_values(config))
        config = load_config(config)
        self.state = ProjectState(config.root_dir, project)
        fitting.collect_dropped(self.state.path)
        self.config: Config = self.state.reconcile(config, self._given)
        self.modules: Dict[str, nn.Module] = {}
        self.rules: Dict[str, Any] = {}
        self.dims: Dict[str, Tuple[int, int, int]] = {}
        self.projector = None
        self.curvature: Optional[Curvature] = None
        self.mode = "log"
        self.phase = "log"
        # what the pass before logging gathers: the statistics pass's K-FAC sums, then (init='query') the
        # query pass's Grams; None once logging starts
        self._pass_stats: Optional[Union[StatisticsPass, QueryGrams]] = None
        self._writer: Optional[LogWriter] = None
        self._logged = 0  # examples logged by this process
        self._stored = None  # the store as is_logged() first saw it (before this process wrote)
        self._pending: Dict[str, Any] = {}
        self._capture: Optional[Capture] = None
        self._last: Optional[Tuple[List[Any], Dict[str, Dict[str, torch.Tensor]]]] = None
        self.analyses: Dict[str, Any] = {}
        self.segments: Optional[Trajectory] = None  # set by watch(): the project's segments
        self._changed: set = set()  # the settings update() was given (named when ranks disagree on one)
        # (id, text) of the last error a `with analog(...)` block of this run raised, and where (see _in_flight)
        self._block_failure: Optional[Tuple[int, str]] = None
        self._ids: Optional[List[Any]] = None  # the ids of the current (or last) block
        self._stopped: Optional[str] = None  # the RankError a collective step raised on every rank (_collective)

    # -- paths ------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.state.path

    @property
    def log_path(self) -> Path:
        """The log store of the active segment (the last one unless ``at_segment`` selects another)."""
        return self.segments.active.logs(self.path) if self.segments is not None else self.state.log_path

    @property
    def curvature_path(self) -> Path:
        """Where the active segment's curvature is saved (``state/`` of its directory)."""
        return self.segments.active.state(self.path) if self.segments is not None else self.state_path

    @property
    def state_path(self) -> Path:
        return self.state.state_path

    @property
    def progress(self) -> bool:
        """Whether long loops show a tqdm bar: config ``progress``, or stderr is a terminal when None."""
        return self.config.progress if self.config.progress is not None else sys.stderr.isatty()

    # -- set-up -----------------------------------------------------------------------------
    def update(self, values: Dict[str, Any]) -> "AnaLog":
        """Merge ``values`` into the config (see analog.config for the keys). Runtime keys
        (analog.state.RUNTIME_KEYS: damping, progress, ...) can change at any time; the others only
        before logging starts, and on a reopened project only to the values it was logged with.

        Under torch.distributed it is local, except that a fixed key changed after ``watch()`` rebuilds the
        projection collectively (as watch() does). Every key but PER_RANK_KEYS must agree across ranks: one
        changed on one rank only, or to different values, is a RankError on every rank at the next collective
        step (naming the key, each rank's value and whose update() set it); ``damping`` is compared by
        distributed scoring only."""
        new = self.config.update(values)
        fixed = sorted(set(flatten(values)) - QUERY_TIME_KEYS)
        started = self._writer is not None or self._logged
        if started and fixed:
            raise RuntimeError(f"update() of {fixed} after logging started would mix settings within one store; "
                               f"only {sorted(QUERY_TIME_KEYS)} can change now")
        self._given = _merged(self._given, values)
        self._changed.update(flatten(values))
        if new.root_dir != self.config.root_dir:
            self.state = ProjectState(new.root_dir, self.project)
        self.config = self.state.reconcile(new, self._given)
        if self.modules and set(fixed) - RUNTIME_KEYS:
            self._setup_state("update()")  # collective under torch.distributed, as watch() is
        elif self.segments is not None:
            self.segments.set_rule(self.config.segments.rule)  # the live trajectory follows a changed rule
        return self

    setup = update

    def watch(self, model: nn.Module, type_filter=None, name_filter=None, exclude=None) -> "AnaLog":
        """Choose the modules of ``model`` to log (see analog.watch); ``analog.coverage`` reports what that covers
        (a warning when trainable parameters are left out). The model is untouched; a DistributedDataParallel
        wrapper is looked through (its module's names, no ``module.`` prefix)."""
        watched = watch_model(distributed.unwrap(model), type_filter, name_filter, exclude)
        meta = [n for n, m in watched.modules.items() if any(p.is_meta for p in m.parameters(recurse=False))]
        if meta:
            raise ValueError(f"module(s) {meta[:5]} have parameters on the meta device (no values): materialise "
                             "the model (e.g. model.to_empty(device=...) and load its weights) before watch()")
        dims = {n: (r.groups(m), r.out_dim(m), r.in_dim(m)) for (n, m), r in zip(watched.modules.items(),
                                                                                   watched.rules.values())}
        self._check_logged_shapes(watched.modules, dims)  # before anything changes: a refused watch() keeps none
        self.modules, self.rules, self.coverage = watched.modules, watched.rules, watched.coverage
        self._root = watched.root
        self.dims = dims
        self._setup_state("watch()")
        return self

    def _setup_state(self, step: str) -> None:
        c = self.config.compression
        self.projector = build_projector(c.type, rank=c.rank, seed=c.seed, init=c.init, damping=c.damping,
                                         allocate=c.allocate)
        self.projector.setup(self.dims)
        saved = self.state.load_projection()
        if saved is not None:
            self.projector.load_tensors(saved)
        self._sync_projector(step)
        self.phase = "pca" if self.projector.needs_fit() else "log"
        self.segments = Trajectory(self.path, self.config.segments.rule)
        self.curvature = self.state.load_curvature(self.curvature_path)
        if self.curvature is None:
            self.curvature = build_curvature(self.config.hessian)
        elif self.curvature.kind != self.config.hessian:
            raise ValueError(
                f"project {self.project!r} at {self.path} holds a fitted {self.curvature.kind!r} curvature but "
                f"the config asks for {self.config.hessian!r}; set hessian={self.curvature.kind!r} to use it, "
                "or log into a new project")

    def _check_logged_shapes(self, modules: Dict[str, nn.Module], dims: Dict[str, Tuple[int, int, int]]) -> None:
        """A watched module the project logged under the same name must have the shape it was logged with
        (state/modules.json; for projects saved before it, the dimensions its saved projection implies):
        otherwise queries would fail deep in a matrix product, naming no module. A ProjectError naming each
        such module, its stored shape and its new one."""
        saved = self.state.saved_modules()
        projection = self.state.load_projection() if saved is None else None
        differ = []
        for name, shape in dims.items():
            if saved is not None:
                if name in saved and tuple(saved[name]) != tuple(shape):
                    differ.append((name, f"(groups, d_out, d_in) {tuple(shape)}",
                                   f"{tuple(saved[name])} ({self.state.modules_file.name})"))
                continue
            groups, d_out, d_in = shape
            for side, what, expected in (("out", "(groups, d_out)", (groups, d_out)),
                                         ("in", "(groups, d_in)", (groups, d_in)),
                                         ("dense", "groups·d_out·d_in", (groups * d_out * d_in,))):
                t = (projection or {}).get(f"{name}/{side}")
                if t is not None and tuple(t.shape[:len(expected)]) != expected:
                    differ.append((name, f"{what} {expected}", f"{tuple(t.shape[:len(expected)])} (its saved "
                                   f"projection {name}/{side} in projection.safetensors)"))
                    break
        if differ:
            def bias(name: str) -> str:
                has_bias = getattr(modules[name], "bias", None) is not None
                return " (d_in includes the bias column)" if has_bias else ""

            lines = "; ".join(f"module {name!r} ({type(modules[name]).__name__}) has {new}{bias(name)}, "
                              f"logged with {stored}" for name, new, stored in differ)
            raise ProjectError(f"project {self.project!r} at {self.path} was logged from another model: {lines}; "
                               "watch the model the project was logged with, or log this model into a new project")

    def _sync_projector(self, step: str) -> None:
        """Under torch.distributed (the collective step ``step``): check that ranks agree on what is projected,
        then give every rank rank 0's projection tensors (seeded alike already; this also covers PCA fits
        and saved state)."""
        self._ranks_checked = None
        if not distributed.is_distributed():
            return
        self._collective(lambda: distributed.check_same(
            "the watched modules, their (groups, d_out, d_in) and the projection", {
                "modules": {n: list(d) for n, d in self.dims.items()},
                "compression": self.config.compression.__dict__,
                "projection tensors": {k: list(v.shape) for k, v in self.projector.tensors.items()},
            }, step, self._in_flight(step), self._agreed(), self._changed))
        if self.projector.tensors:
            self.projector.load_tensors(distributed.broadcast_tensors(self.projector.tensors))

    def _check_ranks(self) -> None:
        """Once per pass: all ranks log the same modules with the same projection. Each rank checks at its
        first logging block of the statistics or logging pass, or, where it had none (a rank may get no
        batch), when it leaves the pass (``next_pass``, ``new_segment``, ``finalize``): so on every rank
        this is the pass's first collective and the check of a rank without data meets its peers'. Not in
        the query pass (init='query'): those ranks are checked by the _sync_projector after the fit."""
        if not distributed.is_distributed() or getattr(self, "_ranks_checked", None) == self.phase:
            return
        if self.phase not in ("pca", "log"):
            return
        step = f"the check of the {self.phase} pass (at its first `with analog(...)` block, or its end if none)"
        self._collective(lambda: distributed.check_same("what they log (modules, projection fingerprint, settings)", {
            "modules": {n: list(d) for n, d in self.dims.items()},
            "projection": self.projector.fingerprint(),
            "pass": self.phase,
            "settings": {k: getattr(self.config, k) for k in ("log", "save", "hessian")},
        }, step, self._in_flight(step), self._agreed(), self._changed))
        self._ranks_checked = self.phase

    # -- collective steps (torch.distributed) -------------------------------------------------
    def _step(self, what: str, value: Any = None, local: Optional[Tuple[str, Any]] = None) -> List[Any]:
        """The first collective of the step ``what`` (``"finalize()"``, ``"new_segment()"``, ...): every rank's
        ``value`` (analog.distributed.step), after ``local = (description, fn)``: ``fn()``, this rank's own part,
        which must happen even if the collective fails (closing its log writer: its chunks on disk also when a
        peer is gone). Raises the same RankError on every rank when a rank calls it while an error propagates
        (in a ``finally:`` or ``except:`` of a failed block: ``_in_flight``), when ``fn()`` raised on a rank
        (named with its description), when ranks are at different steps, or disagree on a setting
        (``_agreed``); see ``_collective``. Without a process group ``fn()``'s error propagates as it is."""
        if not distributed.is_distributed():
            if local is not None:
                local[1]()
            return [value]

        def call():
            failure, error = self._in_flight(what), None
            if local is not None:
                try:
                    local[1]()
                except Exception as e:  # noqa: BLE001 - any error, reported on every rank
                    error = e
                    failure = failure or f"{local[0]}: {distributed.describe(e)}"
            try:
                return distributed.step(what, value, failure, self._agreed(), self._changed)
            except distributed.RankError as e:
                raise e from error

        return self._collective(call)

    def _collective(self, call):
        """``call()``, a collective step (analog.distributed.step or check_same). When it raises a RankError
        (alike on every rank) this AnaLog stops on every rank: its logs so far are closed into the store and
        the project's lock released (fitting.stop; no curvature or state written), and every later logging
        block or collective step raises the same error at once, with no collective, so that a ``finally:
        finalize()`` on each rank cannot leave one waiting for the others. A new AnaLog on the project
        resumes (``is_logged`` skips what is stored)."""
        self._check_not_stopped()
        try:
            return call()
        except distributed.RankError as e:
            self._stopped = str(e)
            fitting.stop(self)
            raise

    def _check_not_stopped(self) -> None:
        if self._stopped is not None:
            raise distributed.RankError(
                f"this AnaLog stopped on every rank when a collective step raised: {self._stopped}; open a new "
                "AnaLog on the project to resume (is_logged() tells which batches its store holds)")

    def _agreed(self) -> Dict[str, Any]:
        """The settings every rank must hold alike (all but PER_RANK_KEYS), one key per setting, and the
        project's name (ranks writing to different projects would each hold a share of the data)."""
        return {"project": self.project,
                **{k: v for k, v in flatten(self.config.to_dict()).items() if k not in PER_RANK_KEYS}}

    def _in_flight(self, what: str) -> Optional[str]:
        """This rank's failure as the collective step ``what`` reports it: the error propagating while it
        was called (it runs in a ``finally:``/``except:`` clause), naming the `with analog(...)` block that
        raised it (or the error in its chain); None when no error propagates, or without a process group."""
        error = sys.exc_info()[1]
        if error is None or not distributed.is_distributed():
            return None
        text, block = distributed.describe(error), self._block_failure
        cause, seen = error, set()
        while block is not None and cause is not None and id(cause) not in seen:
            if id(cause) == block[0]:
                origin = "" if cause is error else f", after {distributed.describe(cause)}"
                return f"{text}{origin} in its {block[1]}; it called {what} while that propagated"
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        return f"{text}; it called {what} while that propagated"

    def _note_failure(self, error: BaseException, data_id: Any) -> None:
        """Remember that a `with analog(data_id=...)` block raised ``error`` (see _in_flight)."""
        self._block_failure = (id(error), f"`with analog(data_id={_short(data_id)})` block")

    # -- logging ----------------------------------------------------------------------------
    def __call__(self, data_id=None, mask: Optional[torch.Tensor] = None, per_token: bool = False) -> "AnaLog":
        """Arguments of the next ``with`` block. ``per_token=True`` (analysis mode) also keeps one
        gradient per token, ``log[module]["token_grad"]`` of shape (B, T, *grad_shape) (a per-head norm's
        heads summed per token; T: the mask's positions, else the model's first input's dimension 1, see
        analog.capture.tokens)."""
        self._pending = {"data_id": data_id, "mask": mask, "per_token": per_token}
        return self

    def __enter__(self) -> "AnaLog":
        data_id = self._pending.get("data_id")
        try:
            return self._enter()
        except BaseException as e:
            self._note_failure(e, data_id)
            raise

    def _enter(self) -> "AnaLog":
        self._check_not_stopped()
        if not self.modules:
            raise RuntimeError("call analog.watch(model) before `with analog(...)`")
        if self._capture is not None:
            raise RuntimeError("`with analog(...)` blocks cannot be nested")
        data_id, mask = self._pending.pop("data_id", None), self._pending.pop("mask", None)
        per_token = self._pending.pop("per_token", False)
        if self.mode == "eval" and not getattr(self, "_warned_training", False):
            if any(m.training for m in self.modules.values()):
                self._warned_training = True
                warnings.warn("analog is in analysis mode but the watched model is in training mode: dropout or "
                              "batch-norm make query gradients differ from run to run; call model.eval()",
                              stacklevel=2)
        if per_token and self.mode != "eval":
            raise ValueError("per_token=True is for queries in analysis mode: call analog.eval() first")
        if self.mode == "log" and self.phase != "query":  # a rank may hold no queries: no collective here
            self._check_ranks()
        ids = to_ids(data_id) if data_id is not None else None
        if ids is not None and not ids:
            raise ValueError("data_id holds no ids (an empty batch): there is nothing to log; skip empty batches")
        if self.mode == "log" and self.phase == "log":
            segmenting.segment_step(self, ids)
        batch_size = len(ids) if ids is not None else None
        self._observed: List[Tuple] = []
        if self.mode == "log" and self.phase in ("pca", "query"):
            if self._pass_stats is None:  # the statistics pass's first block (the query pass's is made by next_pass)
                self._pass_stats = StatisticsPass()
            # a block counts only once it ended without an error (see __exit__): an interrupted block's
            # sums are dropped here, not mixed into this one's
            self._pass_stats.discard_block()
            self._capture = Capture(self.modules, self.rules, NoProjector(), (), batch_size=batch_size,
                                    mask=mask, observer=self._pass_stats.observe, root=self._root)
        else:
            training = self.mode == "log"
            if training and self.curvature.meta["finalized"] and self.curvature.kind != "none":
                raise CurvatureError(
                    f"project {self.project!r} has its {self.curvature.kind} curvature already fitted; logging more "
                    "would not be counted in it: start a new segment with analog.new_segment() or log into a new "
                    "project (nothing of this batch was written)")
            if training and self.config.save and ids is None:
                raise ValueError("pass data_id=... to `with analog(...)` when logs are saved; analog is still "
                                 "logging (training mode): to compute a query gradient instead, call analog.eval() "
                                 "(it runs finalize()) before this block")
            # factors reach the curvature only once the batch passed the checks in __exit__
            observer = (lambda *f: self._observed.append(f)) if training and self.curvature.needs_factors else None
            kinds = (*self.config.log, "token_grad") if per_token else self.config.log
            self._capture = Capture(self.modules, self.rules, self.projector, kinds,
                                    batch_size=batch_size, mask=mask, observer=observer, root=self._root)
        self._ids = ids
        self._capture.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._note_failure(exc, self._ids)
        try:
            self._exit(exc_type, exc, tb)
        except BaseException as e:
            self._note_failure(e, self._ids)
            raise

    def _exit(self, exc_type, exc, tb) -> None:
        capture, self._capture = self._capture, None
        capture.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        capture.finish(self._ids)
        logs = capture.logs
        ids = self._ids if self._ids is not None else list(range(_batch_size(logs)))
        self._check_finite(ids, logs)
        if self.phase in ("pca", "query") and self.mode == "log":
            self._pass_stats.add_block(len(self._ids) if self._ids is not None else None)
        elif self.mode == "log" and logs:
            # what the curvature needs from this pass goes with the rows into the store (committed with
            # their chunk), or into the in-memory curvature when logs are not saved
            stats = self.curvature.batch_stats(self._observed)
            if self.config.save:
                self._write(ids, logs, stats)
            else:
                self.curvature.absorb(stats, len(ids))
            self.segments.logged(ids, list(self.modules))
            self._logged += len(ids)
        self._last = (ids, logs)

    def _writer_checks_finite(self) -> bool:
        """Whether this block's rows go to a quantised (int8/int4/int2) store, whose writer refuses non-finite
        rows itself (its per-field scales are the same reduction), so that the check is not made twice (_write)."""
        return (self.mode == "log" and self.phase == "log" and self.config.save
                and self.config.store_dtype in QUANTISED_DTYPES)

    def _check_finite(self, ids, logs) -> None:
        if self.config.nonfinite != "error" or not logs or self._writer_checks_finite():
            return
        # checked against the dtype of the stored values (a float16 store overflows above 65504; an int8
        # or int4 store holds float32 scales, and its writer refuses what is not finite) without
        # casting: |x| <= finfo.max is False for NaN, ±Inf and values that overflow. One reduction per tensor.
        dtype = value_dtype(self.config.store_dtype) if self.mode == "log" and self.config.save else torch.float32
        limit = torch.finfo(dtype).max
        flags = [~(t.abs().amax() <= limit) for kinds in logs.values() for t in kinds.values() if t.numel()]
        if flags and bool(torch.stack(flags).any()):
            for name, kinds in logs.items():
                for kind, t in kinds.items():
                    bad = (~(t.reshape(t.shape[0], -1).abs() <= limit)).any(1).nonzero().flatten().tolist()
                    if bad:
                        raise FloatingPointError(
                            f"non-finite {kind} log in module {name!r} for ids {[ids[i] for i in bad][:10]}; "
                            "nothing of this batch was stored (set nonfinite='allow' to store it anyway)")

    def _write(self, ids, logs, stats) -> None:
        if self._writer is None:  # the project's lock is held from the first write through fitting
            lock = self.state.acquire()
            self._writer = LogWriter(self.log_path, fields_of(logs), self.config.store_dtype,
                                     self.projector.fingerprint(), self.config.storage.flush_bytes, lock=lock)
            fitting.track_writer(self, self._writer, lock)  # flushed and unlocked if self is dropped
            self._save_state()
        try:
            self._writer.write_logs(ids, logs, stats)
        except NonFiniteBatch as e:  # the same error _check_finite gives for float stores
            raise FloatingPointError(
                f"non-finite {e.kind} log in module {e.module!r} for ids {e.ids[:10]}; nothing of this batch was "
                "stored (set nonfinite='allow' and a float storage.dtype to store it anyway)") from None

    def flush(self) -> None:
        """Wait until every logged batch is on disk (chunks complete); logging may go on afterwards."""
        if self._writer is not None and not self._writer.closed:
            self._writer.flush()

    def get_log(self):
        """(ids, {module: {kind: tensor}}) of the last ``with`` block."""
        if self._last is None:
            raise RuntimeError("no log yet: run a forward/backward pass inside `with analog(...)` first")
        return self._last

    def next_pass(self) -> None:
        """End a pass before logging. After the statistics pass of LoGra ``init='pca'|'whiten'|'whiten_pca'``
        fit the projections from its K-FAC factors (see analog.compression.logra); for ``init='query'``
        derive the whitening from them and start the query pass (blocks over a sample of *queries*), after
        which the projections are fitted from the queries' whitened gradients (analog.compression.query)."""
        if self.phase == "query":
            self._step("next_pass()")
            self._end_query_pass()
            return
        if self.phase != "pca":
            return
        self._check_ranks()  # a rank that had no block in this pass meets its peers' first-block check here
        self._step("next_pass()")
        # a rank that reached no block adds zeros to the sums (and its count, 0, to the examples)
        stats = self._pass_stats if self._pass_stats is not None else StatisticsPass()
        if not stats.examples():  # summed over ranks: the same answer, and error, on every rank
            raise RuntimeError(f"LoGra init={self.projector.init!r} needs a first statistics pass over the data inside "
                               "`with analog(...)` (run the loop under AnaLogScheduler); this statistics pass saw "
                               f"no data{' on any rank' if distributed.is_distributed() else ''}")
        self.projector.fit(stats.factors(self.modules))
        self._pass_stats = None
        if self.projector.init == "query":
            self._pass_stats, self.phase = QueryGrams(self.projector.roots), "query"
            return
        self._sync_projector("next_pass()")
        self.phase = "log"

    def _end_query_pass(self) -> None:
        n_queries, grams = self._pass_stats.reduced()
        if not n_queries:
            raise RuntimeError("LoGra init='query' needs a pass over a sample of queries inside `with analog(...)` "
                               "after the statistics pass (AnaLogScheduler yields 'query' for it); this query "
                               "pass saw no queries")
        self.projector.fit_query(grams)
        self._sync_projector("next_pass()")
        self._pass_stats, self.phase = None, "log"

    # -- end of logging (analog.fitting) ----------------------------------------------------
    def finalize(self) -> None:
        """Flush logs, fit the curvature, save state, release the project's lock. With saved logs the
        curvature is fitted from the store alone (so after a crash, logging what is missing and calling
        finalize() gives the uninterrupted result); a curvature fitted on another content of the store
        is fitted again, with a warning. Calling it again changes nothing."""
        fitting.finalize(self)

    def refit(self) -> None:
        """Fit the curvature again from the store (e.g. after ``analog store repair`` dropped chunks)."""
        fitting.refit(self)

    def is_logged(self, data_id) -> bool:
        """True when every example of ``data_id`` (ids or inputs, as for ``with analog(data_id=...)``) is in
        the store, False when none is: resume a killed run by skipping batches that are logged."""
        return fitting.is_logged(self, data_id)

    def eval(self) -> "AnaLog":
        """Analysis mode: finalize, then `with` blocks capture queries without storing them. Without
        watch() there is nothing to fit or load (a warning says so; reading the store still works)."""
        if not self.modules:
            warnings.warn(f"eval() on AnaLog {self.project!r}, which watches no module: no curvature is fitted or "
                          "loaded and no query can be captured; call analog.watch(model) first (the model the "
                          "project was logged with), then eval()", stacklevel=2)
        self.finalize()
        self.mode = "eval"
        return self

    def _save_state(self) -> None:
        tensors = self.projector.tensors if self.projector is not None else None
        self.state.save(self.config, tensors, self.curvature, self.curvature_path, modules=self.dims)
        if self.segments is not None and self.segments.has_logs():
            self.segments.save()

    # -- segments (analog.segmenting; see analog.trajectory.segments) -----------------------
    def new_segment(self, lr: Optional[float] = None, **info) -> int:
        """Start a new segment: the current one is closed (its logs flushed, its curvature fitted on its
        own logs and saved) and later batches log into the new one; ``lr`` (η of the new segment) and
        ``info`` (e.g. ``epoch=3``, ``step=1200``) are kept in its record. While the current segment
        has logged nothing, this only sets its ``lr``/``info``. Returns the index logged into now."""
        return segmenting.new_segment(self, lr, info)

    def at_segment(self, index: int, parameters: bool = True):
        """Inside the block, queries use segment ``index`` (negative counts from the end): its curvature
        and logs, and with ``parameters=True`` its checkpoint in the watched modules. Afterwards (also
        after an exception) the model's parameters and gradients and the active segment are restored."""
        return segmenting.at_segment(self, index, parameters)

    # -- reading back -----------------------------------------------------------------------
    def open_store(self) -> LogStore:
        fingerprint = self.projector.fingerprint() if self.projector is not None else None
        return LogStore(self.log_path, expect_compression=fingerprint, expect_modules=list(self.modules) or None)

    def build_log_dataloader(self, batch_size: int = 256, num_workers: int = 0):
        return build_log_dataloader(self.open_store(), batch_size, num_workers)

    def add_analysis(self, analyses: Dict[str, type]) -> "AnaLog":
        """Attach analyses by name: ``add_analysis({"influence": InfluenceFunction})`` -> ``analog.influence``."""
        for name, cls in analyses.items():
            if hasattr(type(self), name):
                raise ValueError(f"analysis name {name!r} clashes with an AnaLog attribute")
            self.analyses[name] = cls(self)
        return self

    def __getattr__(self, name: str):
        analyses = self.__dict__.get("analyses", {})
        if name in analyses:
            return analyses[name]
        raise AttributeError(f"AnaLog has no attribute {name!r}; added analyses: {sorted(analyses)}")


def _short(data_id: Any) -> str:
    """``data_id`` for an error message: a list's first ids, a tensor's first characters."""
    short = reprlib.Repr()
    short.maxlist, short.maxother = 6, 60
    return short.repr(data_id)


def _batch_size(logs) -> int:
    for kinds in logs.values():
        for t in kinds.values():
            return t.shape[0]
    return 0


def _merged(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``old`` with ``new`` merged in, sections (dicts) key by key."""
    out = dict(old)
    for key, value in new.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
