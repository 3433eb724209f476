"""Seed 002 (GRAIL) parity: the measurement schedule, gradient and optimizer-state metrics, and the
sparse-quality pass leaving every module in its own train/eval mode."""

import math

import pytest
import torch
from torch import nn

from analog.monitor import (
    GradientMetrics,
    MetricComputer,
    ModelAnalysisManager,
    MomentumMetrics,
    MonitorConfig,
    SparseQualityMetrics,
)


class Blocks(nn.Module):
    """Two numbered blocks (layer_0, layer_1), a BatchNorm inside, and a head outside them."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()), nn.Sequential(nn.Linear(6, 6), nn.Tanh())]
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Window(MetricComputer):
    def compute(self, delta, snapshot, context, **kwargs):
        return {"old": float(delta.old_step), "new": float(delta.new_step)}


def grail_schedule(interval, steps):
    """The original manager: at step % interval == 0, the first time take the snapshot, then measure."""
    out, snapshot = [], None
    for step in range(1, steps + 1):
        if step % interval:
            continue
        if snapshot is not None:
            out.append((snapshot, step))
        snapshot = step
    return out


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_measures_on_the_same_steps_as_grail_without_start(interval):
    model = nn.Linear(2, 2)
    manager = ModelAnalysisManager(MonitorConfig(interval=interval)).add_metric(Window())
    seen = []
    for _ in range(17):
        with torch.no_grad():
            model.weight.add_(0.01)
        metrics = manager.on_optimizer_step(model)
        if metrics:
            seen.append((int(metrics["old"]), int(metrics["new"])))
    assert seen == grail_schedule(interval, 17) and len(seen) >= 2


def _step(model, optimizer, inputs, targets):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


def test_gradient_metrics_against_the_concatenated_gradients():
    torch.manual_seed(0)
    model, inputs, targets = Blocks(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    model.blocks[1][0].bias.requires_grad_(False)  # frozen: neither a gradient nor "missing"
    manager = ModelAnalysisManager(MonitorConfig(interval=1)).add_metric(GradientMetrics(per_layer=True))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    manager.start(model)
    _step(model, optimizer, inputs, targets)
    model.head.bias.grad = None  # trainable without a gradient: counted, left out
    metrics = manager.on_optimizer_step(model, optimizer=optimizer)
    grads = {n: p.grad.double().reshape(-1) for n, p in model.named_parameters() if p.grad is not None}
    compared = 0
    for prefix, names in [("", list(grads)), ("layer_0/", [n for n in grads if n.startswith("blocks.0.")])]:
        flat = torch.cat([grads[n] for n in names])
        reference = {
            "norm_l2": flat.norm().item(),
            "mean": flat.mean().item(),
            "variance": flat.var(correction=0).item(),
            "norm_max": flat.abs().max().item(),
        }
        for key, value in reference.items():
            assert metrics[f"gradient/{prefix}{key}"] == pytest.approx(value, rel=1e-12, abs=1e-15), prefix + key
            compared += 1
    assert compared == 8 and "gradient/layer_1/variance" in metrics and metrics["gradient/params_without_grad"] == 1
    optimizer.zero_grad()
    assert manager.on_optimizer_step(model) == {}
    assert "before optimizer.zero_grad()" in manager.last_errors["GradientMetrics"]


def test_adam_moment_statistics_against_a_hand_run_adam():
    torch.manual_seed(0)
    model, inputs, targets = Blocks(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    lr, (b1, b2), eps = 1e-2, (0.8, 0.95), 1e-8
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    manager = ModelAnalysisManager(MonitorConfig(interval=3)).add_metric(MomentumMetrics(per_layer=True))
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    manager.start(model)
    for _t in range(1, 4):
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        _step(model, optimizer, inputs, targets)
        for n, p in model.named_parameters():  # the reference moments, from the gradients alone
            g = p.grad.double()
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
        metrics = manager.on_optimizer_step(model, optimizer=optimizer)
    assert metrics  # measured at step 3
    mm, vv = torch.cat([x.reshape(-1) for x in m.values()]), torch.cat([x.reshape(-1) for x in v.values()])
    g = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    step = torch.cat([(p.detach().double() - before[n]).reshape(-1) for n, p in model.named_parameters()])
    u = (mm / (1 - b1**3)) / ((vv / (1 - b2**3)).sqrt() + eps)
    nonzero = g != 0
    reference = {
        "exp_avg_norm": mm.norm().item(),
        "exp_avg_abs_mean": mm.abs().mean().item(),
        "exp_avg_sq_mean": vv.mean().item(),
        "exp_avg_sq_sqrt_mean": vv.sqrt().mean().item(),
        "adam_update_rms": u.square().mean().sqrt().item(),
        "grad_sign_agreement": (torch.sign(mm) == torch.sign(g))[nonzero].double().mean().item(),
    }
    for key, value in reference.items():
        assert metrics[f"momentum/{key}"] == pytest.approx(value, rel=1e-5), key
    # the applied step itself: W_t - W_{t-1} = -lr * u for Adam without weight decay
    assert metrics["momentum/adam_update_rms"] * lr == pytest.approx(step.square().mean().sqrt().item(), rel=1e-4)
    layer0 = torch.cat([m[n].reshape(-1) for n in m if n.startswith("blocks.0.")])
    assert metrics["momentum/layer_0/exp_avg_norm"] == pytest.approx(layer0.norm().item(), rel=1e-5)
    assert len(reference) == 6


def test_sgd_momentum_buffer_and_missing_optimizer_are_reported():
    torch.manual_seed(0)
    model, inputs, targets = Blocks(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    manager = ModelAnalysisManager(MonitorConfig(interval=2)).add_metric(MomentumMetrics())
    buffers = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    manager.start(model)
    for _ in range(2):
        _step(model, optimizer, inputs, targets)
        for n, p in model.named_parameters():
            buffers[n] = 0.9 * buffers[n] + p.grad.double() if _ else p.grad.double().clone()
        metrics = manager.on_optimizer_step(model, optimizer=optimizer)
    reference = math.sqrt(sum(float(b.square().sum()) for b in buffers.values()))
    assert metrics == {"momentum/buffer_norm": pytest.approx(reference, rel=1e-6)}
    manager.on_optimizer_step(model)
    assert manager.on_optimizer_step(model) == {}
    assert "optimizer=" in manager.last_errors["MomentumMetrics"]


def test_context_carries_optimizer_metadata_and_attention_mask():
    seen = {}

    class Probe(MetricComputer):
        def compute(self, delta, snapshot, context, **kwargs):
            seen.update(optimizer=context.optimizer, metadata=dict(context.metadata), mask=context.attention_mask)
            return {}

    model, mask = nn.Linear(2, 2), torch.ones(1, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = ModelAnalysisManager(MonitorConfig(interval=1)).add_metric(Probe())
    manager.start(model)
    manager.on_optimizer_step(model, inputs={"attention_mask": mask}, optimizer=optimizer, epoch=3)
    assert seen["optimizer"] is optimizer and seen["metadata"] == {"epoch": 3} and seen["mask"] is mask
    manager.on_optimizer_step(model, inputs=torch.ones(1, 2))
    assert seen["mask"] is None and seen["optimizer"] is None


def test_config_flags_build_the_computers():
    manager = ModelAnalysisManager.create(
        MonitorConfig(
            gradient_enabled=True, momentum_enabled=True, momentum_per_layer=True, sparse_quality_enabled=False
        )
    )
    kinds = [type(c).__name__ for c in manager.computers]
    assert kinds == ["ParameterChangeMetrics", "GradientMetrics", "MomentumMetrics"]
    assert manager.computers[2].per_layer is True and manager.computers[1].per_layer is False


def test_sparse_quality_restores_each_modules_own_mode():
    torch.manual_seed(0)
    model, inputs, targets = Blocks(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model.blocks[0][1].eval()  # the user froze this BatchNorm's statistics
    modes = {name: module.training for name, module in model.named_modules()}
    running = model.blocks[0][1].running_mean.clone()
    manager = ModelAnalysisManager(MonitorConfig(interval=1)).add_metric(SparseQualityMetrics(thresholds=[0.0]))
    manager.start(model)
    _step(model, optimizer, inputs, targets)
    metrics = manager.on_optimizer_step(model, inputs=inputs)
    assert metrics["sparse/kl_at_0"] == 0.0
    after = {name: module.training for name, module in model.named_modules()}
    assert after == modes and len(modes) == 10 and modes["blocks.0.1"] is False and modes[""] is True
    assert torch.equal(model.blocks[0][1].running_mean, running)
