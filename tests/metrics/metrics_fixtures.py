"""Helpers for the checkpoint-metrics tests: real checkpoint files in the layouts analog reads."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

MODEL_SOURCE = """
import torch


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
"""


def tiny_state(seed: int, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """A state dict matching ``TinyNet`` in MODEL_SOURCE."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(5, 6, generator=g) * scale,
        "fc1.bias": torch.randn(5, generator=g),
        "fc2.weight": torch.randn(3, 5, generator=g) * scale,
        "fc2.bias": torch.randn(3, generator=g),
    }


def write_model_file(folder: Path) -> Path:
    path = folder / "tiny_model.py"
    path.write_text(MODEL_SOURCE)
    return path


def write_pico_step(run: Path, step: int, seed: int, split: str = "val", n: int = 64, d: int = 8) -> Path:
    """``run/checkpoints/step_N/learning_dynamics/{split}_{weights,gradients,activations}.pt``."""
    g = torch.Generator().manual_seed(seed)
    folder = run / "checkpoints" / f"step_{step}" / "learning_dynamics"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"model.{i}.mlp" for i in range(2)]
    torch.save({k: torch.randn(d, d, generator=g) for k in names}, folder / f"{split}_weights.pt")
    torch.save({k: torch.randn(d, d, generator=g) * 0.01 for k in names}, folder / f"{split}_gradients.pt")
    torch.save({k: torch.randn(n, d, generator=g) for k in names}, folder / f"{split}_activations.pt")
    return folder


def write_safetensors(path: Path, tensors: Dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
