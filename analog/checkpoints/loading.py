"""Read the tensors of one checkpoint, safely and lazily.

* ``torch.load(..., weights_only=True)`` unless ``allow_pickle=True`` is passed explicitly: a
  checkpoint that needs arbitrary pickled code is refused with an error that says how to opt in.
  Data-only classes scripts save beside the weights (``argparse.Namespace``, ``pathlib`` paths, NumPy
  arrays) are allowed (:func:`data_globals`).
* ``.safetensors`` files are opened with ``safetensors.safe_open`` and read tensor by tensor.
* Zip-format ``.pt`` files are memory-mapped where torch allows it, so a tensor costs memory only
  when it is used.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import torch

from .discovery import NON_MODEL_FILE, CheckpointRef

__all__ = ["CheckpointError", "Checkpoint", "load_tensor_file", "unwrap_state_dict"]

NESTED_KEYS = ("state_dict", "model_state_dict", "model")
DATA_TYPES = ("weights", "gradients", "activations")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or lacks what was asked for; the message names the file."""


class SafetensorsDict(Mapping):
    """A read-only mapping over a ``.safetensors`` file that loads one tensor per lookup."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor '{key}' ({exc})") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class MergedDict(Mapping):
    """Several shard mappings seen as one; a key present in two shards is an error."""

    def __init__(self, shards: List[Mapping], names: List[str]):
        self._where: Dict[str, Mapping] = {}
        for shard, name in zip(shards, names):
            for key in shard:
                if key in self._where:
                    raise CheckpointError(f"tensor '{key}' appears in more than one shard (again in {name})")
                self._where[key] = shard

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def unwrap_state_dict(obj: object, source: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Return the tensors of a loaded checkpoint object.

    A dict nested under ``state_dict``, ``model_state_dict`` or ``model`` is unwrapped first; else,
    with no tensor at the top level, the one value that is a dict holding tensors (``{"net": ...,
    "opt": ..., "step": N}``; an optimizer's state dict holds none at its top level) is used, and
    several such dicts are an error naming them. Non-tensor entries (epoch counters, metadata) are
    dropped. No tensor at all is an error.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    for key in NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping):
            return unwrap_state_dict(inner, source)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        holders = [k for k, v in obj.items() if isinstance(v, Mapping) and any(_is_tensor(x) for x in v.values())]
        if len(holders) == 1:  # {"net": state_dict, "opt": ..., "step": N}: the one dict of tensors
            return unwrap_state_dict(obj[holders[0]], source)
        keys = ", ".join(map(str, list(obj)[:10])) or "(empty)"
        if holders:
            raise CheckpointError(
                f"{source}: no tensors at the top level and several dicts of tensors under "
                f"{', '.join(map(repr, holders))}; which one holds the model is ambiguous: re-save it alone "
                f"(torch.save(ckpt[{holders[0]!r}], path)) or under 'state_dict'"
            )
        raise CheckpointError(f"{source}: no tensors found; top-level keys: {keys}")
    return tensors


def data_globals() -> List[object]:
    """Classes that training scripts commonly save beside the weights and that hold data only:
    ``argparse.Namespace`` (``{"model": ..., "args": args}``), ``pathlib`` paths (Lightning
    hyper-parameters), NumPy arrays, scalars and dtypes (``np.random.get_state()``, metrics).

    ``torch.load(weights_only=True)`` refuses any class it does not know; these are allowed with
    ``torch.serialization.safe_globals``: rebuilding them sets attributes or stores buffers and runs no
    code of the file. Anything else (a pickled ``nn.Module``, a user class) is still refused."""
    import argparse
    import pathlib

    allowed: List[object] = [
        argparse.Namespace,
        pathlib.Path,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
    ]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        return allowed
    multiarray = getattr(np, "_core", None) or np.core
    allowed += [np.ndarray, np.dtype, multiarray.multiarray._reconstruct, multiarray.multiarray.scalar]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25 pickles a dtype with its class
    if dtypes is not None:
        allowed += [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return allowed


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def _torch_load(path: Path, allow_pickle: bool) -> object:
    with torch.serialization.safe_globals(data_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)


def load_tensor_file(path: Union[str, Path], allow_pickle: bool = False) -> Mapping:
    """Open one checkpoint file as a mapping ``name -> tensor`` (lazy for safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsDict(path)
    try:
        obj = _torch_load(path, allow_pickle)
    except pickle.UnpicklingError as exc:
        code = _refused_global(str(exc))
        if code is not None and not allow_pickle:
            raise CheckpointError(
                f"{path}: refused to unpickle code with weights_only=True ({code}). "
                "If you trust this file, pass allow_pickle=True (CLI: --allow-pickle)."
            ) from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from exc
    except Exception as exc:  # a garbage pickle stream can fail in many ways once allow_pickle=True
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return unwrap_state_dict(obj, path)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _refused_global(message: str) -> Optional[str]:
    """The ``Unsupported global: ...`` line of a weights-only refusal, ``None`` for other failures.

    ``torch.load(weights_only=True)`` reports code it will not run (a pickled module or class) and
    plain garbage (random bytes: ``Unsupported operand``) with the same exception type; only the
    first deserves the advice to pass ``allow_pickle``.
    """
    for line in message.splitlines():
        if "Unsupported global" in line:
            return line.strip()
    return None


def _folder_files(folder: Path) -> List[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a readable shard index ({type(exc).__name__}: {exc})") from exc
            if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n != ".." for n in names):
                raise CheckpointError(f"{index}: shard names must be plain file names in {folder}, found {names}")
            return [folder / name for name in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt"):
        files = sorted(f for f in folder.glob(pattern) if not NON_MODEL_FILE.match(f.name))
        if files:
            return files
    raise CheckpointError(f"{folder}: no model weights (model.safetensors, pytorch_model.bin, *.pt) found")


def load_folder(folder: Union[str, Path], allow_pickle: bool = False) -> Mapping:
    """Open a Hugging Face style model folder (sharded or not) as one mapping."""
    files = _folder_files(Path(folder))
    shards = [load_tensor_file(f, allow_pickle) for f in files]
    return shards[0] if len(shards) == 1 else MergedDict(shards, [str(f) for f in files])


class Checkpoint:
    """One checkpoint on disk. Tensors are read on first use and dropped by :meth:`close`.

    ``tensors(data_type, split)`` gives ``name -> tensor`` for ``weights``, ``gradients`` or
    ``activations``. Plain state dicts and model folders only hold weights; the pico-train layout
    holds all three per data split (``{split}_{data_type}.pt``); its weights fall back to the
    model files of the step folder.
    """

    def __init__(self, ref: CheckpointRef, allow_pickle: bool = False):
        self.ref = ref
        self.step = ref.step
        self.allow_pickle = allow_pickle
        self._cache: Dict[tuple, Mapping] = {}

    def tensors(self, data_type: str = "weights", split: Optional[str] = None) -> Mapping:
        if data_type not in DATA_TYPES:
            raise ValueError(f"unknown data_type '{data_type}'; expected one of {', '.join(DATA_TYPES)}")
        key = (data_type, split if self.ref.layout == "pico" else None)
        if key not in self._cache:
            self._cache[key] = self._load(data_type, split)
        return self._cache[key]

    def _load(self, data_type: str, split: Optional[str]) -> Mapping:
        ref = self.ref
        if ref.layout == "pico":
            file = ref.path / "learning_dynamics" / f"{split}_{data_type}.pt"
            if file.is_file():
                return load_tensor_file(file, self.allow_pickle)
            if data_type != "weights":
                raise CheckpointError(f"step {ref.step}: no {data_type} for split '{split}' (expected {file})")
            return load_folder(ref.path, self.allow_pickle)
        if data_type != "weights":
            raise CheckpointError(
                f"step {ref.step}: {ref.path} holds only weights; {data_type} need the pico-train layout "
                "step_N/learning_dynamics/{split}_" + data_type + ".pt"
            )
        if ref.layout == "folder":
            return load_folder(ref.path, self.allow_pickle)
        return load_tensor_file(ref.path, self.allow_pickle)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """All weights as a plain dict (for loading a model); pico steps use their model files."""
        pico = self.ref.layout == "pico"
        weights = load_folder(self.ref.path, self.allow_pickle) if pico else self.tensors("weights")
        return {name: weights[name] for name in weights}

    def close(self) -> None:
        self._cache.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
