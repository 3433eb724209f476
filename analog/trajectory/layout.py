"""On-disk layout of a project's segments, and their records.

A *segment* is a span of training (one pass over the data, or a span of steps) whose logs are
taken at the parameters of that time. Segment 0 lives where a single-segment project always lived,
so a project that never starts a second segment keeps the layout it always had::

    <project>/
      trajectory.json              manifest: {"format": 1, "run": <run id>, "segments": n}
      state/config.json            project-wide: config and projections (shared by every segment)
      state/projection.safetensors
      state/modules.json           the watched modules' (groups, d_out, d_in), checked at watch()
      logs/                        segment 0: its log store,
      state/curvature.*            its curvature (fitted on its logs only),
      segment.json                 its record (below),
      checkpoint.safetensors       and, optionally, the watched parameters at its end
      segments/0001/               segment 1: logs/, state/curvature.*, segment.json, checkpoint.safetensors
      segments/0002/               ...

A segment record (``segment.json``)::

    {"run": <run id>, "index": k, "lr": η_k, "info": {...}, "n": examples logged, "closed": bool,
     "modules": [watched module names], "checkpoint": null | {"file": ..., "bytes": ..., "tensors": ...}}

The run id is drawn once, when the manifest is first written, and copied into every segment record
and checkpoint: a segment (or checkpoint) carrying another run's id, or another index than its
directory, is a ``SegmentError`` naming the file: segments of different runs never mix silently.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from analog.storage.layout import read_json, write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "trajectory.json"
RECORD = "segment.json"
CHECKPOINT = "checkpoint.safetensors"


class SegmentError(RuntimeError):
    """A segment that is missing, belongs to another run, or does not match the model."""


def segment_root(project: Path, index: int) -> Path:
    """Directory of segment ``index``: the project itself for 0, ``segments/NNNN`` after."""
    if index < 0:
        raise SegmentError(f"segment index must be >= 0, got {index}")
    return Path(project) if index == 0 else Path(project) / "segments" / f"{index:04d}"


@dataclass
class SegmentRecord:
    """What is kept of one segment besides its logs and curvature."""

    run: str
    index: int
    lr: float = 1.0
    info: Dict[str, Any] = field(default_factory=dict)
    n: int = 0
    closed: bool = False
    modules: List[str] = field(default_factory=list)
    checkpoint: Optional[Dict[str, Any]] = None

    # -- paths ---------------------------------------------------------------------------------
    def root(self, project: Path) -> Path:
        return segment_root(project, self.index)

    def logs(self, project: Path) -> Path:
        return self.root(project) / "logs"

    def state(self, project: Path) -> Path:
        return self.root(project) / "state"

    def checkpoint_path(self, project: Path) -> Path:
        return self.root(project) / CHECKPOINT

    # -- persistence ---------------------------------------------------------------------------
    def save(self, project: Path) -> None:
        root = self.root(project)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / RECORD, asdict(self))

    @classmethod
    def load(cls, project: Path, index: int, run: str) -> "SegmentRecord":
        path = segment_root(project, index) / RECORD
        values = read_json(path)
        if not isinstance(values, dict) or set(values) - set(cls.__dataclass_fields__):
            raise SegmentError(f"segment record {path} is not a segment record: {values!r}")
        record = cls(**values)
        if record.run != run:
            raise SegmentError(
                f"segment record {path} belongs to run {record.run!r} but project {project} is run {run!r}: "
                "segments of different runs are mixed in one project; log each run into its own project")
        if record.index != index:
            raise SegmentError(f"segment record {path} says index {record.index}, but it is segment {index}")
        return record


def read_manifest(project: Path) -> Optional[Dict[str, Any]]:
    """The manifest, or None for a project that has none yet (new, or written before segments)."""
    path = Path(project) / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION
            or not isinstance(manifest.get("run"), str) or not isinstance(manifest.get("segments"), int)
            or manifest["segments"] < 1):
        raise SegmentError(f"trajectory manifest {path} is corrupt or of another format: {manifest!r}")
    return manifest


def write_manifest(project: Path, run: str, segments: int) -> None:
    Path(project).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(project) / MANIFEST, {"format": FORMAT_VERSION, "run": run, "segments": segments})


def id_key(i: Any) -> Any:
    """A hashable key for an example id (ids read back from JSON are lists where they were tuples)."""
    return tuple(i) if isinstance(i, list) else i


def new_run_id() -> str:
    return uuid.uuid4().hex


def load_records(project: Path) -> List[SegmentRecord]:
    """Every segment record of the project in order (checked against the manifest), or [] when the
    project has no manifest. A segment directory beyond the manifest's count is an error too."""
    project = Path(project)
    manifest = read_manifest(project)
    if manifest is None:
        return []
    records = []
    for k in range(manifest["segments"]):
        if not (segment_root(project, k) / RECORD).exists():
            raise SegmentError(f"project {project} lists {manifest['segments']} segments but segment {k} has no "
                               f"record {segment_root(project, k) / RECORD}")
        records.append(SegmentRecord.load(project, k, manifest["run"]))
    extra = segment_root(project, manifest["segments"])
    if (extra / RECORD).exists():  # a process killed between a new segment's record and the manifest
        records.append(SegmentRecord.load(project, manifest["segments"], manifest["run"]))
    elif extra.exists() and any(extra.iterdir()):
        raise SegmentError(f"{extra} is not listed in {project / MANIFEST} (it lists {manifest['segments']} "
                           "segments) and has no segment record: it comes from another run; remove it")
    return records
