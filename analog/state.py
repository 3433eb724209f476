"""ProjectState: the one owner of a project's state on disk.

Layout under ``root_dir/project/``::

    logs/                        the log store (see analog.storage.layout); logs/writer.lock
    state/config.json            the settings the logs were written with (Config.to_dict())
    state/projection.safetensors the projection tensors (LoGra P_in / P_out, ...)
    state/modules.json           {module: [groups, d_out, d_in]} of the watched modules the logs came from
                                 (a model reopened with other shapes is refused at watch(): AnaLog)
    state/curvature.json         {"kind", "n_samples", "finalized", ...} of the fitted curvature
    state/curvature.safetensors  its tensors
    segments/, trajectory.json   later segments of a training run (analog.trajectory.layout): segment k
                                 keeps its curvature in its own state/, passed here as a directory

Everything here is read and written through this class, never elsewhere:

* **config**: written when the project is first written to; on reopen it is read back and merged
  with what the user passes (``reconcile``): keys that fix what was logged (``log``, ``save``,
  ``hessian``, ``compression.*``, ``storage.dtype``) must equal the saved ones — an error naming
  each key and both values otherwise; ``storage.dtype`` is saved resolved (``auto`` → the dtype
  the rows are stored in) and a given ``auto`` keeps the saved one; a given ``hessian: auto``
  (= True) keeps a saved ``kfac`` (projects saved before ``auto`` existed recorded True so), and
  differs from any other saved kind —
  and runtime keys
  (``RUNTIME_KEYS``: damping, progress, ...) may differ; a runtime key the user does not pass
  keeps its saved value.
* **lock**: one process (per rank) writes a project. ``acquire()`` takes the store's advisory
  lock (``logs/writer.lock``, released by the OS when the process dies) and holds it from the
  first logged batch, through fitting, to the last state file; the log writer shares it.
* **state files** are written atomically (temporary file opened exclusively without following
  links, synced, renamed): a process killed while writing leaves the previous version readable.

Project names are one path component: no separators, no ``..``, not absolute, so a project
cannot write outside ``root_dir``.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from analog.config import Config
from analog.storage.integrity import file_crc32
from analog.storage.layout import write_bytes_atomic
from analog.storage.writer import StoreLock

#: config keys (dotted for sections) that may differ between the run that logged and a later one
RUNTIME_KEYS = frozenset({"root_dir", "damping", "fit_bytes", "progress", "nonfinite", "storage.flush_bytes",
                          "segments.rule", "segments.checkpoint"})


class ProjectError(RuntimeError):
    """A project whose state on disk is unreadable, or does not match what the caller asks for."""


def check_project_name(project: Any) -> str:
    """``project`` if it is a plain directory name (no separators, not ``.``/``..``, not empty)."""
    if not isinstance(project, str):
        raise TypeError(f"project name must be a string, not {type(project).__name__}")
    bad = (not project or project in (".", "..") or "/" in project or "\\" in project or "\0" in project
           or os.path.isabs(project) or (os.altsep is not None and os.altsep in project))
    if bad:
        raise ValueError(f"project name {project!r} must be one directory name under root_dir (no path "
                         "separators, no '.' or '..', not absolute): projects cannot be written elsewhere")
    return project


def flatten(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: one key per setting."""
    out: Dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class ProjectState:
    """Paths, config, projection, curvature and the writer lock of ``root_dir/project``."""

    def __init__(self, root_dir, project: str, rank: Optional[int] = None):
        self.project = check_project_name(project)
        self.root = Path(root_dir)
        self.path = self.root / self.project
        self.log_path = self.path / "logs"
        self.state_path = self.path / "state"
        self._rank = rank
        self._lock: Optional[StoreLock] = None

    @property
    def rank(self) -> int:
        """This process's rank (torch.distributed; 0 without a process group), unless given."""
        from analog import distributed

        return distributed.rank() if self._rank is None else self._rank

    # -- config -----------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.state_path / "config.json"

    def saved_config(self) -> Optional[Dict[str, Any]]:
        """The saved config as a dict, or None for a project never written to."""
        file = self.config_file
        if not file.exists():
            return None
        try:
            values = json.loads(_read_regular(file))
            Config.from_dict(values)
        except (ValueError, TypeError, KeyError) as e:
            raise ProjectError(f"corrupt project config {file}: {e}; it records how the logs were written, "
                               "so the project cannot be reopened safely (restore it or start a new project)") from None
        return values

    def reconcile(self, config: Config, explicit: Dict[str, Any]) -> Config:
        """The config to run with: ``config`` on a new project; on a saved one, the saved settings with
        the runtime keys of ``explicit`` (the keys the user passed) applied. ``explicit`` keys that fix
        what was logged must equal the saved values (compared after normalisation, e.g. hessian True ->
        "auto", which equals a saved "kfac" (True before "auto" existed); a given storage.dtype "auto"
        equals any saved dtype); an error names every key that differs."""
        saved = self.saved_config()
        if saved is None:
            return config
        saved = Config.from_dict(saved).to_dict()  # keys added to analog since it was saved: their defaults
        given, stored = flatten(config.to_dict()), flatten(saved)
        wanted = {k for k in flatten(explicit) if k in given}
        if given["storage.dtype"] == "auto":  # "analog chooses": the project chose when it was first logged
            wanted.discard("storage.dtype")
        if given["hessian"] == "auto" and stored.get("hessian") == "kfac":
            wanted.discard("hessian")  # True: a project saved before 'auto' existed recorded it as kfac
        differ = sorted(k for k in wanted - RUNTIME_KEYS if given[k] != stored.get(k))
        if differ:
            details = "; ".join(f"{k}: saved {stored.get(k)!r}, given {given[k]!r}" for k in differ)
            raise ProjectError(
                f"project {self.project!r} at {self.path} was logged with other settings ({details}); "
                f"only {sorted(RUNTIME_KEYS)} may differ on reopen: drop those keys to use the saved ones, "
                "or log into a new project")
        merged = dict(saved)
        merged["root_dir"] = config.root_dir
        runtime = {k: given[k] for k in wanted & RUNTIME_KEYS}
        for key, value in runtime.items():
            section, _, sub = key.partition(".")
            if sub:
                merged[section] = {**merged[section], sub: value}
            else:
                merged[key] = value
        return Config.from_dict(merged)

    # -- files ------------------------------------------------------------------------------
    @property
    def modules_file(self) -> Path:
        return self.state_path / "modules.json"

    def saved_modules(self) -> Optional[Dict[str, Tuple[int, int, int]]]:
        """{module: (groups, d_out, d_in)} saved with the logs, or None (a project never written to, or
        written before modules.json existed)."""
        file = self.modules_file
        if not file.exists() and not file.is_symlink():
            return None
        try:
            values = json.loads(_read_regular(file))
            if not isinstance(values, dict) or not all(isinstance(d, list) and len(d) == 3
                                                       and all(isinstance(v, int) for v in d) for d in values.values()):
                raise ValueError("expected {module: [groups, d_out, d_in]}")
        except ValueError as e:
            raise ProjectError(f"corrupt module record {file}: {e}; delete it (it only lets watch() refuse a model "
                               "whose modules differ from the logged ones) and reopen the project") from None
        return {name: tuple(d) for name, d in values.items()}

    def load_projection(self) -> Optional[Dict[str, torch.Tensor]]:
        file = self.state_path / "projection.safetensors"
        if not file.exists():
            return None
        return _load_tensors(file, "projection")

    def load_curvature(self, directory: Optional[Path] = None):
        """The saved curvature (of ``directory``, default ``state/``: a segment's curvature lives in its own
        ``state/``, see analog.trajectory.layout), or None when none was saved; a clear error naming the
        file when unreadable."""
        return read_curvature(self.state_path if directory is None else directory)

    def save(self, config: Config, projection: Optional[Dict[str, torch.Tensor]] = None, curvature=None,
             curvature_dir: Optional[Path] = None, modules: Optional[Dict[str, Tuple[int, int, int]]] = None) -> None:
        """Write config, projection, the watched ``modules`` (added to those saved before) and (when fitted)
        curvature, the latter to ``curvature_dir`` (default ``state/``); rank 0 only, under the lock."""
        if self.rank != 0:
            return
        self.acquire()
        self.state_path.mkdir(parents=True, exist_ok=True)
        values = config.to_dict()
        # the dtype the rows are stored in, not 'auto': its resolution depends on runtime keys
        # (nonfinite) and may change between versions, the store's dtype may not
        values["storage"]["dtype"] = config.store_dtype
        write_bytes_atomic(self.config_file, json.dumps(values, indent=1).encode())
        if modules:
            saved = self.saved_modules() or {}
            merged = {**saved, **{name: tuple(int(v) for v in d) for name, d in modules.items()}}
            if merged != saved:
                write_bytes_atomic(self.modules_file,
                                   json.dumps({n: list(d) for n, d in merged.items()}, indent=1).encode())
        if projection:
            write_bytes_atomic(self.state_path / "projection.safetensors",
                               save({k: v.contiguous() for k, v in projection.items()}))
        if curvature is not None and curvature.meta["finalized"]:
            directory = self.state_path if curvature_dir is None else Path(curvature_dir)
            directory.mkdir(parents=True, exist_ok=True)
            # tensors first, then the record naming their checksum: a run killed in between leaves a
            # record that does not match, which reads as "not fitted" and is fitted again
            blob = save({k: v.detach().cpu().contiguous() for k, v in curvature.state.items()})
            write_bytes_atomic(directory / "curvature.safetensors", blob)
            record = {"kind": curvature.kind, **curvature.meta, "crc32": zlib.crc32(blob) & 0xFFFFFFFF}
            write_bytes_atomic(directory / "curvature.json", json.dumps(record).encode())

    # -- lock -------------------------------------------------------------------------------
    def acquire(self) -> StoreLock:
        """Take (once) this rank's writer lock of the project; an error if another process holds it."""
        if self._lock is None or self._lock.file is None or self._lock.file.closed:
            self.log_path.mkdir(parents=True, exist_ok=True)
            self._lock = StoreLock(self.log_path, self.rank)
        return self._lock

    @property
    def locked(self) -> bool:
        return self._lock is not None and self._lock.file is not None and not self._lock.file.closed

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def read_curvature(directory: Path):
    """The curvature saved in ``directory`` (curvature.json + curvature.safetensors), or None when
    there is none; a ``ProjectError`` naming the file when it cannot be trusted."""
    from analog.hessian import build_curvature

    meta_file, tensor_file = Path(directory) / "curvature.json", Path(directory) / "curvature.safetensors"
    if not meta_file.exists() and not meta_file.is_symlink():
        return None
    try:
        meta = json.loads(_read_regular(meta_file))
        if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str) \
                or not isinstance(meta.get("n_samples"), int) or not isinstance(meta.get("finalized"), bool):
            raise ValueError("expected {'kind': str, 'n_samples': int, 'finalized': bool, ...}")
        curvature = build_curvature(meta.pop("kind"))
    except ValueError as e:
        raise ProjectError(f"corrupt curvature metadata {meta_file}: {e}; delete {meta_file.name} and "
                           "finalize() fits the curvature again from the store") from None
    crc = meta.pop("crc32", None)
    if not tensor_file.exists() or (crc is not None and _file_crc(tensor_file) != crc):
        warnings.warn(f"{tensor_file} is missing or does not match its record {meta_file.name} (a run killed "
                      "while saving it, or a changed file): the curvature counts as not fitted, and finalize() "
                      "fits it again from the store", stacklevel=3)
        return None
    curvature.meta = meta
    curvature.state = _load_tensors(tensor_file, "curvature")
    return curvature


def _file_crc(file: Path) -> int:
    if file.is_symlink():
        raise ProjectError(f"{file} is a symbolic link; analog never writes links, so it refuses to read it")
    return file_crc32(file)  # streamed in blocks, not the whole file in memory


def _read_regular(file: Path) -> str:
    """The text of ``file``, refusing a symbolic link (state files are never links)."""
    if file.is_symlink():
        raise ProjectError(f"{file} is a symbolic link; analog never writes links, so it refuses to read it")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProjectError(f"cannot read {file}: {e}") from None


def _load_tensors(file: Path, what: str) -> Dict[str, torch.Tensor]:
    if file.is_symlink():
        raise ProjectError(f"{file} is a symbolic link; analog never writes links, so it refuses to read it")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProjectError(f"corrupt or truncated {what} file {file}: {e}; "
                           + ("delete it and finalize() fits the curvature again from the store"
                              if what == "curvature" else
                              "the logs cannot be matched to queries without it")) from None
