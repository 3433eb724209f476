"""End of logging: flush the logs, fit the curvature, recover from an interrupted run.

The functions here act on an AnaLog (``run``) — its writer, curvature and state — which keeps
owning those attributes; the facade's ``finalize``, ``refit`` and ``is_logged`` delegate here.

* ``finalize``: close the writer, wait for every rank (torch.distributed), then fit the curvature
  under the project's lock — from the store alone when logs are saved (so after a crash, logging
  what is missing and finalizing gives the uninterrupted result), from the in-memory statistics
  otherwise — save the state and release the lock. A curvature whose ``fitted_on`` digest differs
  from the store's is fitted again, with a warning; a fitted, current one is left as it is. Under
  torch.distributed it is collective, also for a rank that logged nothing: that rank fits too, adding
  zeros to every reduction, so the curvature is that of one process over every rank's logs. Its first
  collective is AnaLog._step: a rank arriving while an error propagates (its block failed and its
  ``finally:`` finalizes), or from another step, stops every rank there with one RankError (``stop``).
* ``refit``: fit again from the store, whatever was fitted before (e.g. after ``analog store repair``).
* ``is_logged``: which ids the store (or this process's writer) holds, to skip them on resume.
* ``track_writer``/``collect_dropped``: an AnaLog dropped without ``finalize()`` (e.g. an interrupted
  notebook cell run again) has its logs flushed and its project's lock released when collected.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from pathlib import Path
from typing import Optional

from analog import distributed, segmenting
from analog.hessian import CurvatureError, build_curvature
from analog.ids import to_ids
from analog.storage import LogStore, LogWriter


def finalize(run) -> None:
    """``run.finalize()``: flush, fit the curvature when it needs fitting, save state, release the lock."""
    if run.phase == "query":
        raise RuntimeError(
            "LoGra init='query': the loop so far was its statistics pass and query pass and nothing was logged; "
            "call next_pass() and run the logging loop over the training data, or wrap the loops in "
            "`for phase in AnaLogScheduler(analog)`")
    # A rank with no batch in the pass makes its pass check here, meeting its peers' first-block check
    # (AnaLog._check_ranks); every decision below that leads to a collective is taken alike on every rank.
    if run.mode == "log":
        run._check_ranks()
    # the step's first collective, after this rank closed its writer: a rank that arrives here while an error
    # propagates (finalize() in the `finally:` of a failed block), or from another step, or with other
    # settings, stops every rank here; every rank's chunks are on disk before the curvature reads the store
    in_stats_pass = close_writers(run, "finalize()", run._pass_stats is not None)
    if run.phase == "pca" and any(in_stats_pass):
        raise RuntimeError(
            f"LoGra init={run.projector.init!r}: the loop so far was its statistics pass and nothing was logged; "
            "call next_pass() and run the logging loop again, or wrap the loop in "
            "`for _ in AnaLogScheduler(analog)`")
    try:
        segmenting.end_of_segment(run)
        if run.curvature is None:
            return
        store = store_if_any(run) if run.config.save else None
        if store is not None and run.curvature.meta["finalized"] and stale(run, store):
            # stacklevel 3: the caller of AnaLog.finalize()
            warnings.warn(f"project {run.project!r}: the store changed since its {run.curvature.kind} "
                          "curvature was fitted; fitting it again from the store", stacklevel=3)
            fit(run, store)
        elif not run.curvature.meta["finalized"] and (len(store) if store is not None
                                                      else distributed.total(run.curvature.meta["n_samples"])):
            fit(run, store)  # also on a rank that logged nothing: it adds zeros to the reductions
        elif run._writer is not None:
            run._save_state()
    finally:
        run.state.release()


def refit(run) -> None:
    """``run.refit()``: fit the curvature again from the store; an error without saved logs."""
    if not run.config.save:
        raise CurvatureError("refit() fits from the stored logs, and this project has save=False")
    close_writers(run, "refit()")
    try:
        store = store_if_any(run)
        if store is None or not len(store):
            raise CurvatureError(f"project {run.project!r} has no stored logs at {run.log_path} to fit")
        fit(run, store)
    finally:
        run.state.release()


def close_writers(run, step: str, value=None):
    """Close this rank's log writer (its last chunk to disk), then wait for every rank's: the first collective
    of ``step`` (AnaLog._step; ``value``: what it gathers from every rank, returned). A writer that fails on
    some ranks (e.g. its last chunk cannot be written) is a RankError on every rank naming them and their
    errors, not a wait at the barrier until the group's timeout; the writer is closed before the collective,
    so this rank's logs are on disk also when a peer is gone."""
    def close():
        if run._writer is not None:
            run._writer.close()

    # its gather waits for every rank: the barrier
    return run._step(step, value, local=("closing the log writer", close))


def stop(run) -> None:
    """After a collective step failed alike on every rank (a RankError: analog.AnaLog._step): this rank's
    logs so far go to disk (its writer closed: complete chunks only, the failed block's rows never were
    among them) and the project's lock is released; no curvature or state is written. A later process
    reopens the project, skips the batches ``is_logged()`` finds and ``finalize()``s as after a crash."""
    writer, run._writer = run._writer, None
    try:
        if writer is not None and not writer.closed:
            writer.close()
    except Exception as e:  # noqa: BLE001 - the RankError being raised says what went wrong first
        warnings.warn(f"analog: closing the log writer of {writer.path} after a failed collective step "
                      f"failed too: {e!r}")
    finally:
        run.state.release()


def fit(run, store: Optional[LogStore]) -> None:
    """Under the project's lock: fit (from the store when there is one) and save the state. A store
    opened before this process held the lock is opened again, as it is now that nobody else can write
    it; one opened under the lock (held from the first logged batch) is already that, and is used."""
    if store is not None and not run.state.locked:
        run.state.acquire()
        store = run.open_store()
    run.state.acquire()
    if store is not None:
        run.curvature = build_curvature(run.config.hessian)
    run.curvature.finalize(store, progress=run.progress, fit_bytes=run.config.fit_bytes)
    run._save_state()


def store_if_any(run) -> Optional[LogStore]:
    """The active segment's store, or None when nothing was ever written there."""
    return run.open_store() if (run.log_path / "store.json").exists() else None


def stale(run, store: LogStore) -> bool:
    """Whether the curvature was fitted on another content of ``store`` (its ``fitted_on`` digest differs)."""
    fitted_on = run.curvature.meta.get("fitted_on")
    return fitted_on is not None and fitted_on != store.digest()


def is_logged(run, data_id) -> bool:
    """``run.is_logged(data_id)``: True when every id is stored, False when none is, an error when some are.

    With an open writer it answers for this process's writes; otherwise for the store as it was when
    first asked (``run._stored``, reset when a new segment starts)."""
    ids = to_ids(data_id)
    if run._writer is not None:
        present = [run._writer.holds(i) for i in ids]
    else:
        if run._stored is None:
            run._stored = store_if_any(run) or False
        present = [bool(run._stored) and run._stored.holds(i) for i in ids]
    if any(present) and not all(present):
        raise ValueError(f"ids {[i for i, p in zip(ids, present) if not p][:10]} of this batch are not in the "
                         "store but the others are: log the missing ones in a batch of their own")
    return bool(present) and all(present)


def track_writer(run, writer: LogWriter, lock) -> None:
    """Register ``run``'s new writer. The writer's thread keeps it (and the lock) alive: when ``run`` is
    collected without finalize(), ``writer`` is flushed and ``lock`` released (see collect_dropped)."""
    weakref.finalize(run, _release_dropped, writer, lock).atexit = False
    _OPEN_WRITERS.add(writer)


_OPEN_WRITERS: "weakref.WeakSet[LogWriter]" = weakref.WeakSet()  # writers of this process (see collect_dropped)


def collect_dropped(project: Path) -> None:
    """A writer of this process still open under ``project`` may belong to an AnaLog nobody can reach any
    more (an interrupted notebook cell run again); a collection flushes it and frees the project, so the
    new AnaLog's is_logged() sees those logs and its first batch can take the lock."""
    root = os.path.abspath(project)
    if any(not w.closed and os.path.abspath(w.path).startswith(root + os.sep) for w in list(_OPEN_WRITERS)):
        gc.collect()


def _release_dropped(writer: LogWriter, lock) -> None:
    """When an AnaLog is collected without finalize(): flush its writer and release its lock."""
    try:
        if not writer.closed:
            warnings.warn(f"analog: an AnaLog logging to {writer.path} was dropped without finalize(); its logs "
                          "are flushed and the project is free (log what is missing, then finalize())")
            writer.close()
    except Exception as e:  # called by the garbage collector: nobody to raise to
        warnings.warn(f"analog: flushing {writer.path} of a dropped AnaLog failed: {e!r}")
    finally:
        lock.close()
