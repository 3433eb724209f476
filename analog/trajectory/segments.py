"""The owner of a project's segments: which one is logged into, which one is queried, and when a
batch starts a new one.

Rules (config ``segments.rule``):

* ``"repeat"`` (default): a batch holding an id already logged in the current segment starts a new
  segment before it is logged. A loop over the same data for several epochs therefore logs one
  segment per epoch with no change to the loop. Ids stay unique within a segment.
* ``"manual"``: segments change only at ``analog.new_segment(...)``; a repeated id is an error.

Either way ``analog.new_segment(lr=..., **info)`` starts one explicitly (at an epoch boundary, or every
k steps); it does nothing but set ``lr``/``info`` while the current segment has logged nothing.
Starting a segment closes the previous one: its curvature is fitted on its own logs. With
``segments.checkpoint`` the watched parameters are saved when a segment logs its first batch (just
before that batch's forward pass): the parameters its logs start from. A logging pass over the data
at fixed parameters (TracIn-CP's setting) is thus exactly at its checkpoint; in a loop that logs while
it trains, segment s's checkpoint is the parameters at the start of its span. ``lr`` is η_s of the
segment being started (the previous one's when not given; 1.0 for the first), its weight in the
trajectory scores.

Under torch.distributed every rank logs its shard of each segment into the segment's store; segment
switches are collective (closing a segment fits its curvature across ranks), so every rank must
start a segment at the same step — as with a ``DistributedSampler``, whose epochs start together on
every rank. Rank 0 writes the records, the manifest and the checkpoints. A rank may log no batch of a
segment as long as it still takes part in the switch (an explicit ``new_segment()``, or ``finalize``):
whether the segment has logs is decided over every rank. Rank 0 takes a segment's checkpoint before its
own first batch of it, so with ``segments.checkpoint`` a segment in which rank 0 logged nothing has no
checkpoint: its end (``new_segment``/``finalize``) raises a SegmentError on every rank, before fitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from analog import distributed
from analog.trajectory.layout import (
    SegmentError,
    SegmentRecord,
    id_key,
    load_records,
    new_run_id,
    read_manifest,
    segment_root,
    write_manifest,
)

RULES = ("repeat", "manual")


class Trajectory:
    """Segments of the project at ``project``; the facade asks it where logs and curvature live."""

    def __init__(self, project: Path, rule: str = "repeat"):
        self.set_rule(rule)
        self.project = Path(project)
        self.records: List[SegmentRecord] = load_records(self.project)
        manifest = read_manifest(self.project)
        self.run = manifest["run"] if manifest else new_run_id()
        # whether the current segment held logs before this process: looked at before the collective below, so
        # under torch.distributed before any rank of this run can have logged into it (see needs_checkpoint)
        current = self.records[-1].index if self.records else 0
        self._logs_at_open = (segment_root(self.project, current) / "logs" / "store.json").exists()
        if distributed.is_distributed():  # collective (watch() is): every rank takes rank 0's run id
            self.run = distributed.all_gather_object(self.run)[0]
        if not self.records:  # a new project, or one written before segments: it is segment 0
            self.records = [SegmentRecord(self.run, 0)]
        self.selected: Optional[int] = None  # the segment queries use; None = the last one
        self._ids: set = set()
        self._ids_loaded = False
        self._batches = 0  # batches logged into the current segment by this process
        self._elsewhere = False  # another rank logged into the current segment (see logged_elsewhere)

    # -- where things are ------------------------------------------------------------------------
    @property
    def current(self) -> SegmentRecord:
        """The segment logged into (the last one)."""
        return self.records[-1]

    @property
    def active(self) -> SegmentRecord:
        """The segment queries use: the selected one, else the last."""
        return self.record(self.selected) if self.selected is not None else self.current

    def record(self, index: int) -> SegmentRecord:
        if not isinstance(index, int) or not -len(self.records) <= index < len(self.records):
            raise SegmentError(f"project {self.project} has segments 0..{len(self.records) - 1}, not {index!r}")
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    # -- the rule --------------------------------------------------------------------------------
    def set_rule(self, rule: str) -> None:
        """The rule deciding where a segment starts from now on (``starts_new``): ``repeat`` or ``manual``."""
        if rule not in RULES:
            raise ValueError(f"segments rule must be one of {RULES}, got {rule!r}")
        self.rule = rule

    def starts_new(self, ids: List[Any]) -> bool:
        """Does this batch start a new segment? Rule ``repeat``: yes when one of its ids was logged in
        the current segment; rule ``manual``: such an id is an error."""
        self._load_ids()
        seen = next((i for i in ids if id_key(i) in self._ids), None)
        if seen is None:
            return False
        if self.rule == "manual":
            raise ValueError(f"id {seen!r} was already logged in segment {self.current.index}; ids are unique within "
                             "a segment: call analog.new_segment() first (e.g. at each epoch), or use segments rule "
                             "'repeat' (nothing of this batch was stored)")
        return True

    def logged(self, ids: List[Any], modules: List[str]) -> None:
        """Note a logged batch of the current segment (its ids, and the modules it watches)."""
        self._load_ids()
        self._ids.update(id_key(i) for i in ids)
        self._batches += 1
        record = self.current
        if record.closed:
            raise SegmentError(f"segment {record.index} of {self.project} is closed; start a new one")
        if not record.modules:
            record.modules = list(modules)
        elif record.modules != list(modules):
            raise SegmentError(f"this batch logs modules {list(modules)} but segment {record.index} logged "
                               f"{record.modules}")

    def _load_ids(self) -> None:
        """Ids already on disk in the current segment (a process resuming a project)."""
        if self._ids_loaded:
            return
        from analog.storage import LogStore

        logs = self.current.logs(self.project)
        if (logs / "store.json").exists():
            self._ids.update(id_key(i) for i in LogStore(logs).ids)
        self._ids_loaded = True

    def has_logs(self) -> bool:
        """Has the current segment logged anything (here, or on disk before this process)?"""
        self._load_ids()
        return bool(self._ids) or self._batches > 0 or self._elsewhere

    def logged_elsewhere(self, modules) -> None:
        """At the end of a segment under torch.distributed, when some rank logged into it: it has logs here
        too, of ``modules`` (every rank watches the same ones, checked), so rank 0 writes its record even
        when it logged no batch of it itself."""
        self._elsewhere = True
        if not self.current.modules:
            self.current.modules = list(modules)

    def needs_checkpoint(self) -> bool:
        """Whether the current segment's checkpoint is still to be taken before this process's next batch:
        it logged no batch of the segment, which held no logs when this process opened it. Not ``not
        has_logs()``: under torch.distributed the store also holds what other ranks logged since, which says
        nothing about whether this rank (rank 0 writes checkpoints) took the checkpoint."""
        return self._batches == 0 and not (self._logs_at_open and self.has_logs())

    @property
    def batches(self) -> int:
        """Batches this process logged into the current segment."""
        return self._batches

    # -- opening and closing ---------------------------------------------------------------------
    def close(self) -> SegmentRecord:
        """Mark the current segment closed (a later one follows it)."""
        record = self.current
        record.closed = True
        self.save()
        return record

    def snapshot(self, modules) -> Dict[str, int]:
        """Save the watched parameters as the current segment's checkpoint; returns its size and count."""
        from analog.trajectory.checkpoint import save_checkpoint

        record = self.current
        if distributed.rank() != 0:  # parameters are the same on every rank: rank 0 writes them
            return {}
        record.root(self.project).mkdir(parents=True, exist_ok=True)
        info = save_checkpoint(record.checkpoint_path(self.project), modules, self.run, record.index)
        record.checkpoint = {"file": record.checkpoint_path(self.project).name, **info}
        self.save()
        return info

    def open_next(self, lr: Optional[float] = None, info: Optional[Dict[str, Any]] = None) -> SegmentRecord:
        """Start segment k+1 after the closed segment k; it inherits k's lr unless ``lr`` is given."""
        previous = self.current
        if not previous.closed:
            raise SegmentError(f"segment {previous.index} is still open: close it first")
        root = SegmentRecord(self.run, previous.index + 1).root(self.project)
        if distributed.rank() == 0 and root.exists() and any(root.iterdir()):
            raise SegmentError(f"{root} exists already and is not a segment of this run; remove it")
        self.records.append(SegmentRecord(self.run, previous.index + 1, previous.lr if lr is None else float(lr),
                                          dict(info or {})))
        self._ids, self._ids_loaded, self._batches, self._elsewhere = set(), True, 0, False
        self._logs_at_open = False
        self.save()
        distributed.barrier()  # rank 0 checked and wrote the new segment before any rank logs into it
        return self.current

    def annotate(self, lr: Optional[float] = None, info: Optional[Dict[str, Any]] = None) -> None:
        """Set the lr / info of the current segment (before it logs anything, or any time)."""
        if lr is not None:
            self.current.lr = float(lr)
        self.current.info.update(info or {})

    def save(self) -> None:
        """Write the current segment's record, then the manifest (a crash between them is recovered
        on reopen: a record one past the manifest's count is adopted). Rank 0 writes them."""
        if distributed.rank() != 0:
            return
        self.current.save(self.project)
        write_manifest(self.project, self.run, len(self.records))

    def summary(self) -> List[Dict[str, Any]]:
        """One row per segment: index, lr, info, closed, checkpoint bytes (None without one)."""
        return [{"index": r.index, "lr": r.lr, "info": dict(r.info), "closed": r.closed,
                 "checkpoint_bytes": (r.checkpoint or {}).get("bytes")} for r in self.records]
