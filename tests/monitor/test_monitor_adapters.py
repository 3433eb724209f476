"""A real training loop with LoRA-style adapters on a frozen base, AdamW with param groups: the default
(all parameters, as GRAIL) and ``trainable_only`` against an independent computation."""

import torch
from torch import nn

from analog.monitor import ModelAnalysisManager, MonitorConfig


class LoRALinear(nn.Module):
    """W x + B A x with W frozen (r = 2)."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16).requires_grad_(False)
        self.q_proj = LoRALinear(nn.Linear(16, 16))
        self.v_proj = LoRALinear(nn.Linear(16, 16))
        self.head = nn.Linear(16, 20)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.head(torch.relu(self.q_proj(h)) + self.v_proj(h))


def _train(trainable_only: bool):
    torch.manual_seed(0)
    model = Net()
    adapters = [p for n, p in model.named_parameters() if "lora" in n]
    opt = torch.optim.AdamW([{"params": adapters, "lr": 1e-2}, {"params": model.head.parameters(), "lr": 1e-3,
                                                                  "weight_decay": 0.0}])
    config = MonitorConfig(interval=3, trainable_only=trainable_only, sparse_quality_thresholds=[0.0, 1e-3])
    manager = ModelAnalysisManager.create(config)
    manager.start(model)
    x = torch.randint(0, 20, (8, 5))
    y = torch.randint(0, 20, (8, 5))
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    results = []
    for _ in range(3):
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        results.append(manager.on_optimizer_step(model, inputs={"input_ids": x}, optimizer=opt))
        opt.zero_grad()
    after = {n: p.detach().double() for n, p in model.named_parameters()}
    return model, manager, before, after, results[-1], results[:-1]


def test_trainable_only_measures_the_adapters_and_head():
    model, manager, before, after, metrics, between = _train(trainable_only=True)
    assert between == [{}, {}] and manager.last_errors == {}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(manager.snapshot.names) == set(trainable) and len(trainable) == 6  # 4 adapters + head
    delta = torch.cat([(after[n] - before[n]).flatten() for n in trainable])
    assert manager.snapshot.numel == delta.numel() == 4 * 2 * 16 + 16 * 20 + 20
    assert abs(metrics["param_change/norm_l2"] - float(delta.norm())) <= 1e-6 * float(delta.norm())
    for t, label in ((1e-8, "1e-08"), (1e-4, "1e-04")):
        expected = float((delta.abs() > t).double().mean())
        assert abs(metrics[f"param_change/changed_ratio_at_{label}"] - expected) < 1e-12
    assert abs(metrics["sparse/kept_ratio_at_1e-03"] - float((delta.abs() > 1e-3).double().mean())) < 1e-12


def test_frozen_weights_dilute_ratios_by_default_but_outputs_agree():
    model, manager, before, after, full, _ = _train(trainable_only=False)
    _, _, _, _, trainable, _ = _train(trainable_only=True)
    n_all = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert manager.snapshot.numel == n_all and n_all > 2 * n_trainable
    changed_all = full["param_change/changed_ratio_at_1e-08"] * n_all
    changed_trainable = trainable["param_change/changed_ratio_at_1e-08"] * n_trainable
    assert abs(changed_all - changed_trainable) < 1e-6  # the same changed entries, other denominators
    assert full["param_change/norm_l2"] == trainable["param_change/norm_l2"]
    for key in ("sparse/kl_at_1e-03", "sparse/top1_agree_at_1e-03", "sparse/kl_at_0"):
        assert full[key] == trainable[key]


def test_a_dataloader_batch_as_inputs_is_explained():
    """`inputs=(x, y)` runs model(x, y): the sparse metrics fail with a message saying so and what to pass;
    parameter change is still reported, and inputs=x then gives the sparse metrics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for inputs in ((x, y), x):
        manager = ModelAnalysisManager.create(MonitorConfig(interval=1, sparse_quality_thresholds=[1e-6]))
        manager.start(model)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        metrics = manager.on_optimizer_step(model, inputs=inputs)
        opt.zero_grad()
        sparse = [k for k in metrics if k.startswith("sparse/")]
        assert "param_change/norm_l2" in metrics
        if isinstance(inputs, tuple):
            assert sparse == []
            error = manager.last_errors["SparseQualityMetrics"]
            assert "model(*inputs) with 2 positional arguments (tensor(16, 8), tensor(16,))" in error
            assert "pass inputs=x" in error
        else:
            assert manager.last_errors == {} and len(sparse) == 4 + 2 + 4 + 1  # scores, kept, unchanged, random
