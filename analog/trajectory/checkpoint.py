"""Checkpoints of the watched parameters, and putting them into the user's model for a query.

A checkpoint holds, for every watched module ``m`` and each of its parameters ``p``, the tensor
under the key ``"{m}.{p}"`` (the model's ``state_dict`` name when ``m`` is the qualified module
name), saved with safetensors (no pickle) together with metadata: the run id and segment index it
belongs to, which are checked when it is read. Only watched modules' parameters are kept: the other
parameters of the model keep the values they have when a segment is put in.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from analog.storage.layout import write_bytes_atomic
from analog.trajectory.layout import SegmentError


def watched_parameters(modules: Dict[str, nn.Module]) -> Dict[str, nn.Parameter]:
    """``{"{module}.{param}": parameter}`` of the watched modules, in watch order."""
    return {f"{m}.{p}": param for m, module in modules.items() for p, param in module.named_parameters()}


def save_checkpoint(path: Path, modules: Dict[str, nn.Module], run: str, index: int) -> Dict[str, int]:
    """Write the watched parameters to ``path`` atomically; returns {"bytes": file size, "tensors": count}."""
    tensors = {k: p.detach().to("cpu", copy=True).contiguous() for k, p in watched_parameters(modules).items()}
    meta = {"run": run, "segment": str(index), "modules": json.dumps(list(modules))}
    data = save(tensors, metadata=meta)
    write_bytes_atomic(Path(path), data)
    return {"bytes": len(data), "tensors": len(tensors)}


def load_checkpoint(path: Path, run: str, index: int) -> Dict[str, torch.Tensor]:
    """The tensors of segment ``index``'s checkpoint, after checking it belongs to ``run`` and ``index``."""
    path = Path(path)
    if not path.exists():
        raise SegmentError(f"segment {index} has no checkpoint ({path} is missing): log with "
                           "update({'segments': {'checkpoint': True}}) to keep the watched parameters of each "
                           "segment, or query only the segments that have one")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise SegmentError(f"segment checkpoint {path} cannot be read: {e}") from e
    if meta.get("run") != run or meta.get("segment") != str(index):
        raise SegmentError(
            f"segment checkpoint {path} belongs to run {meta.get('run')!r}, segment {meta.get('segment')}, "
            f"but this is run {run!r}, segment {index}: segments of different runs are mixed in one project")
    return tensors


def check_match(params: Dict[str, nn.Parameter], tensors: Dict[str, torch.Tensor], where: str) -> None:
    """The model's watched parameters must be exactly the checkpoint's, shape for shape."""
    missing, extra = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
    if missing or extra:
        raise SegmentError(
            f"the watched modules of the query model differ from those of {where}: parameters only in the "
            f"checkpoint {missing[:10]}, only in the model {extra[:10]}; watch the same modules of the same "
            "architecture")
    for k, t in tensors.items():
        if tuple(params[k].shape) != tuple(t.shape):
            raise SegmentError(f"parameter {k!r} has shape {tuple(params[k].shape)} in the query model but "
                               f"{tuple(t.shape)} in {where}")


@contextlib.contextmanager
def parameters_of(modules: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor],
                  where: str = "the checkpoint") -> Iterator[None]:
    """Inside the block the watched parameters hold ``tensors``; afterwards (also after an exception)
    they hold their values from before, and their ``.grad`` is what it was before the block.

    Values are copied in place (``param.copy_``), so the same ``nn.Parameter`` objects stay in the model
    (optimizers, hooks and DDP keep working); ``.grad`` is set aside, so that gradients of a query
    step inside the block never mix with the user's training gradients.
    """
    params = watched_parameters(modules)
    check_match(params, tensors, where)
    saved: Dict[str, Tuple[torch.Tensor, object]] = {}
    try:
        with torch.no_grad():
            for k, p in params.items():
                saved[k] = (p.detach().clone(), p.grad)
                p.grad = None
                p.copy_(tensors[k])
        yield
    finally:
        with torch.no_grad():
            for k, (value, grad) in saved.items():
                params[k].copy_(value)
                params[k].grad = grad
