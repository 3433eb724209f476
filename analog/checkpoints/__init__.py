"""Loading directories of checkpoints: discovery by step, safe and lazy reading, strict model loading."""

from .discovery import CheckpointRef, discover_checkpoints, select_steps, step_from_name
from .loading import Checkpoint, CheckpointError, load_tensor_file, unwrap_state_dict
from .model import load_model_class, load_strict

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointRef",
    "discover_checkpoints",
    "load_model_class",
    "load_strict",
    "load_tensor_file",
    "select_steps",
    "step_from_name",
    "unwrap_state_dict",
]
