"""ModelAnalysisManager: intervals, presets, fail-safety, parameter-set changes, weight integrity."""

import logging

import pytest
import torch
from torch import nn

from analog.monitor import MetricComputer, ModelAnalysisManager, MonitorConfig, ParameterChangeMetrics
from analog.monitor.sparse_quality import compare_logits


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        self.forward_calls = 0
        self.fail_on_call = None

    def forward(self, x):
        self.forward_calls += 1
        if self.forward_calls == self.fail_on_call:
            raise RuntimeError("forward failed on purpose")
        return self.head(torch.relu(self.body(x)))


class StepRecorder(MetricComputer):
    """Reports the steps its delta spans."""

    def compute(self, delta, snapshot, context, **kwargs):
        return {"steps/old": float(delta.old_step), "steps/new": float(delta.new_step), "steps/ctx": context.step}


class Broken(MetricComputer):
    def compute(self, **kwargs):
        raise ZeroDivisionError("broken on purpose")


def _train(model, manager, steps, inputs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    results = {}
    for step in range(1, steps + 1):
        loss = model(inputs).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        metrics = manager.on_optimizer_step(model, inputs=inputs, optimizer=optimizer)
        optimizer.zero_grad()
        if metrics:
            results[step] = metrics
    return results


def test_intervals_respected_with_and_without_start():
    torch.manual_seed(0)
    inputs = torch.randn(5, 4)
    model = Classifier()
    manager = ModelAnalysisManager(MonitorConfig(interval=3)).add_metric(StepRecorder())
    manager.start(model)
    results = _train(model, manager, 10, inputs)
    assert sorted(results) == [3, 6, 9]
    assert [(r["steps/old"], r["steps/new"]) for r in results.values()] == [(0, 3), (3, 6), (6, 9)]
    manager.reset()
    results = _train(model, manager, 10, inputs)
    # GRAIL's schedule: every multiple of the interval; the first one only takes the reference
    grail = [step for step in range(1, 11) if step % 3 == 0][1:]
    assert sorted(results) == grail == [6, 9]
    assert [(r["steps/old"], r["steps/new"]) for r in results.values()] == [(3, 6), (6, 9)]
    manager.start(model, step=4)  # e.g. a resumed run at global step 4: schedule stays on multiples of 3
    assert [r["steps/ctx"] for r in _train(model, manager, 5, inputs).values()] == [6, 9]
    assert manager.state_dict() == {"step": 9}
    manager.load_state_dict({"step": 1})  # no snapshot is saved: step 3 takes the reference
    assert manager.snapshot is None
    assert [r["steps/ctx"] for r in _train(model, manager, 5, inputs).values()] == [6]


def test_create_presets_and_metric_keys():
    assert MonitorConfig.minimal().sparse_quality_enabled is False
    assert MonitorConfig.minimal().interval > MonitorConfig.comprehensive().interval
    assert MonitorConfig.comprehensive(interval=2).param_change_per_layer is True
    with pytest.raises(ValueError, match="interval"):
        MonitorConfig(interval=0)
    with pytest.raises(ValueError, match="thresholds"):
        MonitorConfig(sparse_quality_thresholds=[-1.0])
    minimal = ModelAnalysisManager.create(MonitorConfig.minimal(interval=1))
    assert [type(c).__name__ for c in minimal.computers] == ["ParameterChangeMetrics"]
    torch.manual_seed(0)
    model, inputs = Classifier(), torch.randn(5, 4)
    full = ModelAnalysisManager.create(MonitorConfig.comprehensive(interval=2))
    assert [type(c).__name__ for c in full.computers] == [
        "ParameterChangeMetrics",
        "GradientMetrics",
        "MomentumMetrics",
        "SparseQualityMetrics",
    ]
    results = _train(model, full, 5, inputs)
    assert sorted(results) == [4]
    keys = results[4]
    assert "gradient/layer_0/norm_l2" not in keys and "gradient/norm_l2" in keys  # no numbered blocks here
    # plain SGD keeps no state: said, not silently skipped
    assert list(full.last_errors) == ["MomentumMetrics"] and "SGD keeps no" in full.last_errors["MomentumMetrics"]

    for thr in ("1e-08", "1e-06", "1e-04"):
        for name in ("kl", "cosine", "mse", "top1_agree"):
            assert f"sparse/{name}_at_{thr}" in keys and f"sparse/{name}_at_{thr}_random" in keys
        assert f"param_change/sparsity_at_{thr}" in keys
    assert all(isinstance(v, float) for v in keys.values())


def test_one_failing_computer_does_not_stop_the_others(caplog):
    torch.manual_seed(0)
    model, inputs = Classifier(), torch.randn(5, 4)
    manager = ModelAnalysisManager(MonitorConfig(interval=1)).add_metric(Broken()).add_metric(ParameterChangeMetrics())
    with caplog.at_level(logging.WARNING, logger="analog.monitor.manager"):
        results = _train(model, manager, 3, inputs)
    assert sorted(results) == [2, 3]
    assert all("param_change/norm_l2" in r for r in results.values())
    assert "ZeroDivisionError" in manager.last_errors["Broken"]
    assert "metric Broken failed" in caplog.text


def test_failed_forward_is_logged_and_weights_restored_bit_exactly():
    torch.manual_seed(0)
    model, inputs = Classifier(), torch.randn(5, 4)
    manager = ModelAnalysisManager.create(MonitorConfig(interval=2, sparse_quality_thresholds=[0.0, 1e-3]))
    _train(model, manager, 2, inputs)  # step 2 takes the reference
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fail_on_call = model.forward_calls + 3  # the second sparse forward of the measurement
    manager.on_optimizer_step(model, inputs=inputs)
    metrics = manager.on_optimizer_step(model, inputs=inputs)
    assert "param_change/norm_l2" in metrics and not any(k.startswith("sparse/") for k in metrics)
    assert "forward failed" in manager.last_errors["SparseQualityMetrics"]
    assert len(before) == 4
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_changed_parameter_set_resets_with_clear_message(caplog):
    torch.manual_seed(0)
    model, inputs = Classifier(), torch.randn(5, 4)
    manager = ModelAnalysisManager(MonitorConfig(interval=1)).add_metric(ParameterChangeMetrics())
    _train(model, manager, 2, inputs)
    model.extra = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="analog.monitor.manager"):
        assert manager.on_optimizer_step(model) == {}
    assert "parameter set changed" in caplog.text and "added: extra.bias, extra.weight" in caplog.text
    assert manager.snapshot is not None and "extra.weight" in manager.snapshot.names
    assert "param_change/norm_l2" in manager.on_optimizer_step(model)


def test_attention_mask_weights_positions():
    torch.manual_seed(0)
    full, sparse = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    weighted = compare_logits(full, sparse, mask)
    kept = mask.bool()
    direct = compare_logits(full[kept], sparse[kept])
    assert len(direct) == 4
    for key, value in direct.items():
        assert weighted[key] == pytest.approx(value, rel=1e-6), key
