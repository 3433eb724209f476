"""The facade's segment glue: start segments, and query one of them (see analog.trajectory.segments).

The functions here act on an AnaLog (``run``); its ``segments`` (a Trajectory) owns the records,
checkpoints and which segment is active; ``run`` keeps its writer and curvature. The facade's
``new_segment`` and ``at_segment`` delegate here; ``segment_step`` runs before each logged batch.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Optional

from analog import distributed
from analog.hessian import Curvature, build_curvature
from analog.trajectory import SegmentError, load_checkpoint, parameters_of


def new_segment(run, lr: Optional[float], info: Dict[str, Any]) -> int:
    """``run.new_segment(lr, **info)`` (``info`` a dict here, so any key may be in it): finalize the
    current segment (when it logged anything) and open the next; the index logged into now."""
    if run.segments is None or run.mode != "log":
        raise RuntimeError("new_segment() is for logging: call analog.watch(model) first, and not after eval()")
    segments = run.segments
    run._check_ranks()  # a rank that logged no batch yet makes the pass check here, meeting its peers'
    # the step's first collective (see AnaLog._step); any rank's logs: the same answer on every rank
    if not any(run._step("new_segment()", segments.has_logs())):
        segments.annotate(lr, info)
        return segments.current.index
    run.finalize()
    segments.close()
    segments.open_next(lr, info)
    run._writer, run.curvature, run._stored = None, build_curvature(run.config.hessian), None
    return segments.current.index


def end_of_segment(run) -> None:
    """At ``finalize`` under torch.distributed (collective): when any rank logged into the current segment,
    every rank counts it as logged (so rank 0 writes its record and state also when it logged none of it).
    With ``segments.checkpoint``, a segment this run logged into but rank 0 logged no batch of has no
    checkpoint (rank 0 takes it before its own first batch): a SegmentError on every rank, before anything
    is fitted."""
    if not distributed.is_distributed() or run.segments is None:
        return
    segments = run.segments
    run._check_ranks()  # a rank that logged no batch yet makes the pass check here, meeting its peers'
    if not distributed.any_rank(segments.has_logs()):
        return
    segments.logged_elsewhere(list(run.modules))
    if not run.config.segments.checkpoint or not distributed.any_rank(segments.batches > 0):
        return  # nothing logged into it by this run: its checkpoint (or none) is what an earlier run left
    if distributed.any_rank(distributed.rank() == 0 and segments.current.checkpoint is None and segments.batches == 0):
        index = segments.current.index
        raise SegmentError(
            f"segment {index} has no checkpoint: rank 0 writes a segment's checkpoint (the watched parameters) "
            f"before its own first batch of it, and logged no batch of segment {index}; give rank 0 a batch of "
            "every segment, or set segments.checkpoint false (its logs are kept: finalize() again fits them)")


def segment_step(run, ids) -> None:
    """Before a logged batch: start a new segment if the rule says so; a segment's checkpoint is
    taken before its first batch (the parameters its logs start from)."""
    if ids is not None and run.segments.starts_new(ids):
        if run.segments.batches == 0:  # the repeated ids were logged by an earlier process, not this one
            warnings.warn(
                f"project {run.project!r} already holds this batch's ids in segment {run.segments.current.index} "
                f"(logged by an earlier process, in {run.path}), so this batch starts segment "
                f"{run.segments.current.index + 1} (segments rule 'repeat'): right when this process continues "
                "the training (its next epoch); if it re-runs the same logging, the project now holds the data "
                "twice — use a new project name or remove the project's directory, and to resume an interrupted "
                "run skip the batches analog.is_logged(ids) reports", stacklevel=4)
        run.new_segment()
    if run.config.segments.checkpoint and run.segments.needs_checkpoint():
        run.segments.snapshot(run.modules)


@contextlib.contextmanager
def at_segment(run, index: int, parameters: bool = True):
    """``run.at_segment(index, parameters)``: segment ``index``'s curvature, logs and (``parameters``)
    checkpoint inside the block; the previous ones restored afterwards, also after an exception."""
    if run.segments is None:
        raise RuntimeError("call analog.watch(model) before at_segment()")
    record = run.segments.record(index)
    if record.modules and record.modules != list(run.modules):
        raise SegmentError(f"the query model's watched modules {list(run.modules)} differ from the modules "
                           f"{record.modules} logged in segment {record.index}")
    swap = contextlib.nullcontext()
    if parameters:
        tensors = load_checkpoint(record.checkpoint_path(run.path), run.segments.run, record.index)
        swap = parameters_of(run.modules, tensors, f"segment {record.index}")
    saved = run.curvature, run.segments.selected
    try:
        run.segments.selected = record.index
        if record is not run.segments.current:
            run.curvature = saved_curvature(run, record.index)
        with swap:
            yield record
    finally:
        run.curvature, run.segments.selected = saved


def saved_curvature(run, index: int) -> Curvature:
    """The fitted curvature of segment ``index`` (selected, so ``run.curvature_path`` is its ``state/``)."""
    curvature = run.state.load_curvature(run.curvature_path)
    if curvature is None:
        raise SegmentError(f"segment {index} has no fitted curvature in {run.curvature_path}; segments are "
                           "fitted when the next one starts and at finalize()")
    return curvature
