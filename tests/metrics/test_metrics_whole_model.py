"""Phase-Viz parity: whole-model values (all parameters at once) and the six layer-set metrics, against
the seed's formulas written out here with numpy/scipy on the parameters of a real ``nn.Module``."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from analog.metrics import LayerData, parse_config, run_metrics
from analog.metrics.layerwise import (
    CapacityMetric,
    ConnectivityMetric,
    FlatnessMetric,
    GradientFlowMetric,
    MaxActivationMetric,
)


def _net(seed):
    torch.manual_seed(seed)
    # wide matrices only, so the block-diagonal matrix has exactly the union of their singular values
    return torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


ELEMENTWISE = ["variance", "entropy", "kurtosis", "skewness", "mean", "weight_norm", "participation", "sparsity"]
MATRIX = ["spectral", "connectivity", "norm_ratio", "capacity", "gradient_flow", "flatness", "max_activation"]
SPECTRAL = ["condition", "effective_rank", "stable_rank", "isotropy", "nuclear"]


def _phase_viz(net):
    """The seed's formulas (README of seed 001) on the module's trainable parameters."""
    params = [p.detach().double().numpy() for p in net.parameters()]
    flat = np.concatenate([p.ravel() for p in params])
    mats = [p for p in params if p.ndim >= 2]
    hist, _ = np.histogram(flat, bins=100)
    prob = hist[hist > 0] / flat.size
    sv = [np.linalg.svd(w, compute_uv=False) for w in mats]

    def eff(s, eps=0.0):
        p = s / s.sum()
        return float(np.exp(-(p * np.log(p + eps)).sum()))

    return {
        "variance": np.var(flat),
        "entropy": -(prob * np.log(prob)).sum(),
        "kurtosis": scipy.stats.kurtosis(flat),  # Fisher, biased (scipy's default, as Phase-Viz)
        "skewness": scipy.stats.skew(flat),
        "mean": flat.mean(),
        "weight_norm": np.sqrt((flat**2).sum()),
        "participation": (flat**2).sum() ** 2 / (flat**4).sum(),
        "sparsity": np.mean(np.abs(flat) < 1e-3),
        "spectral": max(s[0] for s in sv),
        "connectivity": np.mean([np.abs(w).mean() for w in mats]),
        "norm_ratio": np.linalg.norm(mats[-1]) / np.linalg.norm(mats[0]),
        "capacity": sum(math.log(w.shape[0] + 1) for w in mats),
        "gradient_flow": np.mean([1 / (1 + abs(w.std(ddof=1) - math.sqrt(2 / w.shape[1]))) for w in mats]),
        "flatness": math.sqrt(sum((w**2).sum() for w in mats)) * max(s[0] for s in sv),
        "max_activation": np.mean([math.log(w.size) * eff(s, 1e-10) / s.size for w, s in zip(mats, sv)]),
    }


def _block_diagonal_spectrum(net):
    """Closed form for the pooled spectral metrics: the SVD of the explicit block-diagonal matrix."""
    mats = [p.detach().double() for p in net.parameters() if p.dim() >= 2]
    s = torch.linalg.svdvals(torch.block_diag(*mats)).numpy()
    lam = s**2
    p = s / s.sum()
    return {
        "condition": s[0] / s[-1],
        "effective_rank": np.exp(-(p * np.log(p)).sum()),
        "stable_rank": lam.sum() / lam[0],
        "isotropy": lam.sum() ** 2 / (lam.size * (lam**2).sum()),
        "nuclear": s.sum(),
    }


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pv")
    nets = {step: _net(step) for step in (0, 5)}
    for step, net in nets.items():
        torch.save(net.state_dict(), root / f"step_{step}.pt")
    from analog.metrics.cli import ALIASES

    entries = []
    for name in ELEMENTWISE + MATRIX + SPECTRAL:
        metric, settings = ALIASES.get(name, (name, {}))
        entries.append({"metric_name": metric, "name": name, **settings})
    config = parse_config({"analysis_name": "pv", "metrics": entries})
    paths = run_metrics(config, root, output_dir=str(root / "out"), quiet=True)
    return nets, paths["out_dir"]


def _whole(out_dir, step, name):
    payload = json.loads((out_dir / f"step_{step}" / f"{name}_val.json").read_text())
    return payload["whole_model.simple:weights"], payload


@pytest.mark.parametrize("step", [0, 5])
def test_whole_model_values_match_phase_viz_formulas(analysed, step):
    nets, out_dir = analysed
    expected = _phase_viz(nets[step])
    compared = 0
    for name in ELEMENTWISE + MATRIX:
        got, _ = _whole(out_dir, step, name)
        assert got == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
        compared += 1
    assert compared == 15


@pytest.mark.parametrize("step", [0, 5])
def test_pooled_spectral_values_are_those_of_the_block_diagonal_matrix(analysed, step):
    nets, out_dir = analysed
    expected = _block_diagonal_spectrum(nets[step])
    for name in SPECTRAL:
        assert _whole(out_dir, step, name)[0] == pytest.approx(expected[name], rel=1e-9), name


def test_whole_model_is_not_the_mean_of_layer_values_and_is_in_csv(analysed):
    nets, out_dir = analysed
    whole, per_layer = _whole(out_dir, 0, "variance")
    layer_values = [v for k, v in per_layer.items() if not k.startswith("whole_model")]
    assert len(layer_values) == 6  # 3 weights + 3 biases
    assert abs(whole - np.mean(layer_values)) > 1e-3 * whole
    _, norm_ratio = _whole(out_dir, 0, "norm_ratio")
    assert list(norm_ratio) == ["whole_model.simple:weights"]  # a whole-model-only metric
    csv_text = (out_dir / "metrics.csv").read_text()
    assert csv_text.count(",whole_model,whole_model.simple:weights,") == 2 * len(ELEMENTWISE + MATRIX + SPECTRAL)


def test_whole_model_can_be_switched_off(tmp_path):
    torch.save(_net(0).state_dict(), tmp_path / "step_1.pt")
    config = parse_config({"analysis_name": "off", "metrics": [{"metric_name": "variance", "whole_model": False}]})
    out = run_metrics(config, tmp_path, output_dir=str(tmp_path / "out"), quiet=True)["out_dir"]
    assert "whole_model" not in (out / "metrics.csv").read_text()


def _layer(w):
    return LayerData("w", torch.as_tensor(w, dtype=torch.float64))


def test_layer_set_metrics_per_layer_on_a_conv_kernel():
    g = torch.Generator().manual_seed(3)
    kernel = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) * 0.3  # fan_in 12, fan_out 4
    w = kernel.reshape(4, 12).numpy()
    s = np.linalg.svd(w, compute_uv=False)
    p = s / s.sum()
    layer = LayerData("conv", kernel)
    assert ConnectivityMetric().compute(layer) == pytest.approx(np.abs(w).mean())
    assert CapacityMetric().compute(layer) == pytest.approx(math.log(5))
    he = 1 / (1 + abs(w.std(ddof=1) - math.sqrt(2 / 12)))
    xavier = 1 / (1 + abs(w.std(ddof=1) - math.sqrt(2 / 16)))
    assert GradientFlowMetric().compute(layer) == pytest.approx(he)
    assert GradientFlowMetric(init="xavier").compute(layer) == pytest.approx(xavier)
    assert FlatnessMetric().compute(layer) == pytest.approx(np.linalg.norm(w) * s[0])
    expected = math.log(48) * np.exp(-(p * np.log(p + 1e-10)).sum()) / 4
    assert MaxActivationMetric().compute(layer) == pytest.approx(expected)


def test_layer_set_metrics_closed_forms():
    eye = _layer(np.eye(5))
    assert GradientFlowMetric().compute(_layer(np.zeros((3, 2)))) == pytest.approx(1 / (1 + 1))  # std 0, sqrt(2/2)=1
    assert MaxActivationMetric().compute(eye) == pytest.approx(math.log(25), rel=1e-8)  # effective rank 5 = r
    assert FlatnessMetric().compute(eye) == pytest.approx(math.sqrt(5))
    assert math.isnan(MaxActivationMetric().compute(_layer(np.zeros((2, 2)))))


def test_norm_inf_is_pico_analyzes_torch_norm():
    w = torch.tensor([[1.0, -5.0], [3.0, 4.0]], dtype=torch.float64)
    from analog.metrics.elementwise import NormMetric

    assert NormMetric(norm_type="inf").compute(LayerData("w", w)) == float(torch.norm(w, p=float("inf"))) == 5.0
