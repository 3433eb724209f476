"""Find the checkpoints in a directory and order them by training step.

Recognised entries (the step is the number after ``step`` in the name, else its last integer; see
:func:`step_from_name`; order is numeric, never lexical):

* files ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.bin``, ``*.safetensors`` holding a state dict
  (``model_step_1200.pt``, ``ckpt-30.safetensors``);
* Hugging Face model folders (``checkpoint-N/``, ``step-N/``) with ``model.safetensors``,
  ``pytorch_model.bin`` or their sharded forms;
* the pico-train layout ``step_N/learning_dynamics/{split}_{activations,weights,gradients}.pt``
  (optionally under ``RUN/checkpoints/``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

__all__ = [
    "CheckpointRef",
    "CHECKPOINT_SUFFIXES",
    "NON_MODEL_FILE",
    "discover_checkpoints",
    "select_steps",
    "step_from_name",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
MODEL_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_LAST_INT = re.compile(r"(\d+)(?!.*\d)")
#: files of training state that are not model weights (optimizer, scheduler, RNG, trainer arguments), as
#: Hugging Face Trainer, Accelerate and hand-written loops name them: never read as a checkpoint
NON_MODEL_FILE = re.compile(
    r"(?i)^(optimizer|optim|opt_state|scheduler|lr_scheduler|rng_state|random_states|training_args|scaler|"
    r"trainer_state)(?![a-z])"
)
_EXPLICIT_STEP = re.compile(r"(?i)step[=_-]?(\d+)")
_LIGHTNING_VERSION = re.compile(r"-v\d+$")


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint lives: ``layout`` is ``"file"``, ``"folder"`` (HF) or ``"pico"``."""

    step: int
    path: Path
    layout: str


def step_from_name(name: str) -> Optional[int]:
    """The training step in a checkpoint's name (without its suffix), ``None`` when there is none.

    An explicit step wins: the number after the last ``step`` (``epoch=2-step=300.ckpt`` -> 300,
    ``step_1000_loss_0.5.pt`` -> 1000, ``global_step40`` -> 40). Otherwise the last integer
    (``checkpoint-500``, ``model_30.safetensors``), after dropping the ``-vN`` that Lightning appends to
    a file name that already exists (``last-v1.ckpt`` has no step, not step 1).
    """
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    explicit = _EXPLICIT_STEP.findall(name)
    if explicit:
        return int(explicit[-1])
    match = _LAST_INT.search(_LIGHTNING_VERSION.sub("", name))
    return int(match.group(1)) if match else None


def _folder_layout(folder: Path) -> Optional[str]:
    if (folder / "learning_dynamics").is_dir():
        return "pico"
    for pattern in MODEL_FILE_PATTERNS:
        if any(not NON_MODEL_FILE.match(f.name) for f in folder.glob(pattern)):
            return "folder"
    return None


def discover_checkpoints(root: Union[str, Path]) -> List[CheckpointRef]:
    """List the checkpoints under ``root`` sorted by step.

    Raises ``FileNotFoundError`` when ``root`` does not exist and ``ValueError`` when it holds no
    checkpoint or two entries share a step (both paths are named).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    if not root.is_dir():
        raise ValueError(f"expected a directory of checkpoints, got a file: {root}")
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    found: dict = {}
    skipped: List[str] = []
    not_models: List[str] = []
    for child in sorted(root.iterdir()):
        step = step_from_name(child.name)
        if child.is_file() and child.name.endswith(CHECKPOINT_SUFFIXES):
            if NON_MODEL_FILE.match(child.name):
                not_models.append(child.name)
                continue
            layout = "file"
        elif child.is_dir():
            layout = _folder_layout(child)
        else:
            continue
        if layout is None:
            continue
        if step is None:
            skipped.append(child.name)
            continue
        if step in found:
            raise ValueError(f"two checkpoints for step {step}: {found[step].path} and {child}")
        found[step] = CheckpointRef(step=step, path=child, layout=layout)
    if skipped:
        warnings.warn(f"skipped checkpoints without a step number in their name: {', '.join(skipped)}")
    if not_models:
        warnings.warn(f"skipped optimizer/scheduler/training-state files (not model weights): {', '.join(not_models)}")
    if not found:
        raise ValueError(
            f"no checkpoints found in {root}: expected files ending in {', '.join(CHECKPOINT_SUFFIXES)} "
            "or folders named like checkpoint-N/, step-N/ or step_N/ with a step number N"
        )
    return [found[step] for step in sorted(found)]


def select_steps(
    refs: Sequence[CheckpointRef], steps: Optional[Sequence[int]], on_missing: str = "warn"
) -> List[CheckpointRef]:
    """Keep the checkpoints at ``steps`` (all when ``None``).

    A listed step absent on disk is skipped with a ``UserWarning`` naming it and the available
    steps (as pico-analyze does), or raises ``ValueError`` with ``on_missing="error"``. No listed
    step present at all is always an error.
    """
    if on_missing not in ("warn", "error"):
        raise ValueError(f"on_missing must be 'warn' or 'error', got {on_missing!r}")
    if steps is None:
        return list(refs)
    by_step = {ref.step: ref for ref in refs}
    missing = sorted({step for step in steps if step not in by_step})
    kept = [by_step[step] for step in sorted(set(steps)) if step in by_step]
    if missing:
        available = ", ".join(str(ref.step) for ref in refs)
        message = f"step(s) {missing} not found among the checkpoints; available steps: {available}"
        if on_missing == "error" or not kept:
            raise ValueError(message)
        warnings.warn(f"{message}. Skipping the missing step(s).", UserWarning, stacklevel=2)
    return kept
