"""Checkpoint metrics on a tiny training run: train an MLP, save checkpoints, analyse them, open the report.

    python examples/checkpoint_metrics_demo.py [--out DIR]

The same analysis from the command line:

    analog metrics --dir DIR/checkpoints --metrics spectral,stable_rank,per,entropy,gini
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from analog.metrics import parse_config, run_metrics


def train_and_save(folder: Path, steps: int = 400, every: int = 25) -> None:
    """A 2-layer MLP on a teacher task; the learning rate jumps at step 200, a planted phase change."""
    torch.manual_seed(0)
    teacher = torch.nn.Linear(16, 4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(steps + 1):
        if step % every == 0:
            save_file(
                {k: v.detach().clone() for k, v in model.state_dict().items()}, str(folder / f"step-{step}.safetensors")
            )
        if step == 200:
            for group in opt.param_groups:
                group["lr"] = 0.3
        x = torch.randn(64, 16)
        loss = torch.nn.functional.mse_loss(model(x), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="analog_metrics_"))
    train_and_save(root / "checkpoints")
    config = parse_config(
        {
            "analysis_name": "mlp_demo",
            "metrics": [
                {"metric_name": "norm", "norm_type": "spectral", "components": [{"layer_suffixes": ["0", "2"]}]},
                {"metric_name": "stable_rank", "components": [{"layer_suffixes": ["0", "2"]}]},
                {"metric_name": "cka", "target_checkpoint": 400, "components": [{"layer_suffixes": "0"}]},
            ],
            "monitoring": {"output_dir": str(root / "analysis")},
        }
    )
    paths = run_metrics(config, root / "checkpoints")
    print(f"metrics:     {paths['metrics']}\ntransitions: {paths['transitions']}\nreport:      {paths['report']}")


if __name__ == "__main__":
    main()
