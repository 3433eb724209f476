"""Library-free reference methods, written directly from the formulas (``(task) -> scores``, n_test × n_train).

- ``random``: i.i.d. standard normal scores (seeded). Its LDS must be ≈ 0; anything else is a harness bug.
- ``grad_dot``: identity Hessian, score(q, t) = g_qᵀ g_t.
- ``exact_fisher``: score(q, t) = g_qᵀ (F + λI)⁻¹ g_t with F = (1/N) Σ_i g_i g_iᵀ the explicitly formed
  empirical Fisher of the mean training loss, λ = ``task.damping``, solved in float64. This is the
  uncompressed reference that analog's ``raw`` Hessian should reproduce.

g_i = ∇θ CE(f_θ(x_i), y_i) over all parameters, computed with ``torch.func`` (vmap of grad).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.influence.task import Task


def per_example_grads(task: Task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """n × n_params matrix of per-example cross-entropy gradients (float64)."""
    model = task.fresh_model()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        logits = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1).double()


def random_scores(task: Task, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((task.n_test, task.n_train))


def grad_dot(task: Task) -> np.ndarray:
    g_train = per_example_grads(task, task.x_train, task.y_train)
    g_test = per_example_grads(task, task.x_test, task.y_test)
    return (g_test @ g_train.T).numpy()


def exact_fisher(task: Task) -> np.ndarray:
    g_train = per_example_grads(task, task.x_train, task.y_train)
    g_test = per_example_grads(task, task.x_test, task.y_test)
    fisher = g_train.T @ g_train / task.n_train
    fisher.diagonal().add_(task.damping)
    preconditioned = torch.linalg.solve(fisher, g_test.T).T  # (F + λI)⁻¹ g_q, F symmetric
    return (preconditioned @ g_train.T).numpy()
