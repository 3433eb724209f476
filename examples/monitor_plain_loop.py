"""Training monitor in a plain PyTorch loop: a small language model on synthetic sequences.

    python examples/monitor_plain_loop.py [--steps 60] [--interval 20]

Prints the parameter-change and sparse-update-quality metrics every ``--interval`` optimizer
steps. Pass ``log_fn=wandb.log`` style callables wherever you keep metrics; here we print.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from analog.monitor import ModelAnalysisManager, MonitorConfig


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks (``up_proj``/``down_proj``), output head."""

    def __init__(self, vocab: int = 32, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(dim, 4 * dim), "down_proj": nn.Linear(4 * dim, dim)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.layers:
            h = h + block["down_proj"](torch.relu(block["up_proj"](h)))
        return self.lm_head(h)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=20)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 32, (256, 17))
    probe = data[:8, :-1]  # a fixed batch: comparable sparse-quality numbers across measurements

    config = MonitorConfig.comprehensive(interval=args.interval, sparse_quality_thresholds=[1e-6, 1e-4, 1e-3])
    analyzer = ModelAnalysisManager.create(config)
    analyzer.start(model)  # reference weights before the first step

    for step in range(1, args.steps + 1):
        batch = data[torch.randint(0, len(data), (16,))]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        # before zero_grad: the gradient metrics read the gradients of the step just applied
        metrics = analyzer.on_optimizer_step(model, inputs=probe, optimizer=optimizer)
        optimizer.zero_grad()
        if metrics:
            print(f"step {step}: loss {loss.item():.4f}")
            for key in (
                "param_change/norm_l2",
                "param_change/sparsity_at_1e-06",
                "sparse/kl_at_1e-04",
                "sparse/kl_at_1e-04_random",
                "sparse/top1_agree_at_1e-03",
                "sparse/kept_ratio_at_1e-03",
                "gradient/norm_l2",
                "momentum/adam_update_rms",
            ):
                print(f"    {key:32s} {metrics[key]:.6g}")


if __name__ == "__main__":
    main()
