"""The one task every influence method in this benchmark is scored on.

Data: scikit-learn's ``load_digits`` (8×8 digit images, 1797 examples, ships with scikit-learn, no
download). A seeded permutation gives a fixed split of ``n_train`` training and ``n_test`` test examples;
features are standardised with the training split's mean and standard deviation.

Model: an MLP of ``nn.Linear`` layers with ReLU (64 → hidden → 10), so that Kronfluence can track every
layer.

Training objective (full batch, deterministic for a fixed init seed)::

    L(θ) = (1/N) Σ_i CE(f_θ(x_i), y_i) + (wd/2) ‖θ‖²

optimised with full-batch Adam for ``steps`` steps. The Hessian of the data term is the *mean* of the
per-example Hessians; every method in the benchmark approximates that mean-normalised curvature and adds
the same absolute damping ``λ = DAMPING`` (= ``wd``, the curvature the L2 term itself contributes).

Attribution loss: per-example cross-entropy (summed over a batch, so that per-example gradients are
g_i = ∇θ CE(f_θ(x_i), y_i)). Measurement for the LDS: the test example's cross-entropy loss.
TRAK is the one exception: it keeps its own built-in measurement (the correct-class margin), which is how
users run it.
"""

from __future__ import annotations

import dataclasses
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Absolute damping λ added to the mean-normalised Hessian / Fisher by every method.
DAMPING = 1e-3


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Everything that defines the task; two tasks with equal configs are identical."""

    name: str = "digits-mlp32"
    hidden: int = 32
    n_train: int = 1000
    n_test: int = 600
    n_query_batches: int = 3
    split_seed: int = 0
    model_seed: int = 0
    steps: int = 500
    lr: float = 1e-2
    weight_decay: float = 1e-3


CONFIGS = {
    "small": TaskConfig(),
    "wide": TaskConfig(name="digits-mlp128", hidden=128),
}


@dataclasses.dataclass
class Task:
    """A trained model plus its data. Tensors are float32 / int64 on the CPU."""

    config: TaskConfig
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    model: nn.Module
    damping: float = DAMPING

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def query_batches(self) -> List[np.ndarray]:
        """Test indices split into ``n_query_batches`` consecutive batches (the repeated-query case)."""
        return np.array_split(np.arange(self.n_test), self.config.n_query_batches)

    def fresh_model(self) -> nn.Module:
        """A deep copy of the trained model, so a method may wrap or modify it freely."""
        model = make_model(self.config, seed=self.config.model_seed)
        model.load_state_dict(self.model.state_dict())
        model.eval()
        return model


def load_data(config: TaskConfig):
    """Return ``(x_train, y_train, x_test, y_test)`` for the fixed, seeded, standardised split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(config.split_seed).permutation(len(y))
    train_idx = perm[: config.n_train]
    test_idx = perm[config.n_train : config.n_train + config.n_test]
    if len(test_idx) < config.n_test:
        raise ValueError(f"load_digits has only {len(y)} examples")
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0) + 1e-6  # a few border pixels are constant
    x = (x - mean) / std
    as_x = lambda idx: torch.tensor(x[idx], dtype=torch.float32)
    as_y = lambda idx: torch.tensor(y[idx], dtype=torch.int64)
    return as_x(train_idx), as_y(train_idx), as_x(test_idx), as_y(test_idx)


def make_model(config: TaskConfig, seed: int) -> nn.Module:
    """MLP 64 → hidden → 10, initialised from ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 10))
    torch.random.set_rng_state(gen_state)
    return model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TaskConfig) -> nn.Module:
    """Full-batch Adam on mean cross-entropy + (wd/2)‖θ‖². Deterministic: no sampling anywhere."""
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    for _ in range(config.steps):
        opt.zero_grad(set_to_none=True)
        l2 = sum((p * p).sum() for p in model.parameters())
        loss = F.cross_entropy(model(x), y) + 0.5 * config.weight_decay * l2
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example (the LDS measurement)."""
    return F.cross_entropy(model(x), y, reduction="none")


def build_task(config_name: str = "small") -> Task:
    """Load the data and train the model on the full training split (about a second on one core)."""
    config = CONFIGS[config_name]
    x_train, y_train, x_test, y_test = load_data(config)
    model = train(make_model(config, seed=config.model_seed), x_train, y_train, config)
    return Task(config, x_train, y_train, x_test, y_test, model)
