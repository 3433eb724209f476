"""Known values of the single-checkpoint metrics, against closed forms and numpy."""

import math

import numpy as np
import pytest
import torch

from analog.metrics import METRICS, LayerData, MetricInputError
from analog.metrics.elementwise import gini, hoyer
from analog.metrics.spectral import fit_power_law


def compute(name, tensor, **settings):
    return METRICS.get(name)(**settings).compute(LayerData("layer.0", tensor, step=7))


@pytest.mark.parametrize("n", [5, 64])
def test_gini_and_hoyer_of_constant_and_one_hot(n):
    constant = torch.full((n,), 2.5, dtype=torch.float64)
    one_hot = torch.zeros(n, dtype=torch.float64)
    one_hot[3] = -4.0
    assert gini(constant) == pytest.approx(0.0, abs=1e-12)
    assert hoyer(constant) == pytest.approx(0.0, abs=1e-12)
    assert gini(one_hot) == pytest.approx(1 - 1 / n, abs=1e-12)
    assert hoyer(one_hot) == pytest.approx(1.0, abs=1e-12)


def test_gini_matches_mean_absolute_difference_formula():
    w = torch.as_tensor(np.random.default_rng(0).standard_normal(50))
    c = np.abs(w.numpy())
    reference = np.abs(c[:, None] - c[None, :]).sum() / (2 * c.size * c.sum())
    assert gini(w) == pytest.approx(reference, rel=1e-10)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_effective_rank_of_identity_is_n(n):
    assert compute("effective_rank", torch.eye(n)) == pytest.approx(n, rel=1e-12)
    assert compute("per", torch.eye(n)) == pytest.approx(1.0, rel=1e-12)


def test_stable_rank_of_orthogonal_and_rank_one():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    rank_one = torch.outer(torch.randn(6), torch.randn(10))
    assert compute("stable_rank", q) == pytest.approx(8.0, rel=1e-10)
    assert compute("stable_rank", rank_one) == pytest.approx(1.0, rel=1e-6)
    assert compute("effective_rank", rank_one) == pytest.approx(1.0, rel=1e-4)


def test_norms_condition_number_and_isotropy_against_numpy():
    w = np.random.default_rng(1).standard_normal((7, 4))
    s = np.linalg.svd(w, compute_uv=False)
    t = torch.as_tensor(w)
    checks = {
        ("norm", "frobenius"): np.linalg.norm(w),
        ("norm", "nuclear"): s.sum(),
        ("norm", "spectral"): s[0],
        ("norm", "max"): np.abs(w).max(),
    }
    for (name, kind), expected in checks.items():
        assert compute(name, t, norm_type=kind) == pytest.approx(expected, rel=1e-10)
    assert compute("condition_number", t) == pytest.approx(s[0] / s[-1], rel=1e-10)
    lam = s**2
    assert compute("isotropy", t) == pytest.approx(lam.sum() ** 2 / (4 * (lam**2).sum()), rel=1e-10)
    assert compute("isotropy", torch.eye(5)) == pytest.approx(1.0)
    assert compute("participation_ratio", t, over="spectrum") == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    assert compute("participation_ratio", t) == pytest.approx((w**2).sum() ** 2 / (w**4).sum(), rel=1e-10)
    assert len(checks) == 4


def test_moments_entropy_and_sparsity_against_numpy():
    w = np.random.default_rng(2).gamma(2.0, size=(30, 20))
    t = torch.as_tensor(w)
    m = w - w.mean()
    m2, m3, m4 = (m**2).mean(), (m**3).mean(), (m**4).mean()
    assert compute("mean", t) == pytest.approx(w.mean())
    assert compute("variance", t) == pytest.approx(w.var())
    assert compute("skewness", t) == pytest.approx(m3 / m2**1.5)
    assert compute("kurtosis", t) == pytest.approx(m4 / m2**2 - 3)
    assert compute("kurtosis", t, excess=False) == pytest.approx(m4 / m2**2)
    counts, _ = np.histogram(w, bins=17)
    p = counts[counts > 0] / w.size
    assert compute("entropy", t, bins=17) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    assert compute("entropy", torch.ones(10)) == 0.0
    assert compute("sparsity", t, threshold=1.0) == pytest.approx((np.abs(w) < 1.0).mean())


@pytest.mark.parametrize("alpha", [2.0, 3.0])
def test_power_law_exponent_recovered_from_pareto_samples(alpha):
    rng = np.random.default_rng(3)
    samples = (rng.pareto(alpha - 1, 4000) + 1.0) * 2.0  # density ~ x^-alpha for x >= 2
    fixed, xmin, _ = fit_power_law(samples, xmin=2.0)
    chosen, _, _ = fit_power_law(samples)
    assert xmin == 2.0
    assert fixed == pytest.approx(alpha, abs=0.1)
    assert chosen == pytest.approx(alpha, abs=0.2)


def test_spectral_metrics_share_one_svd_and_work_on_bf16():
    layer = LayerData("w", torch.randn(12, 9).to(torch.bfloat16))
    names = ["per", "effective_rank", "stable_rank", "condition_number", "isotropy", "power_law_alpha"]
    values = [METRICS.get(n)().compute(layer) for n in names]
    values.append(METRICS.get("norm")(norm_type="spectral").compute(layer))
    assert layer.svd_calls == 1
    assert layer.singular_values.dtype == torch.float64
    assert len(values) == 7 and all(isinstance(v, float) for v in values)
    reference = np.linalg.svd(layer.tensor.float().numpy().astype(np.float64), compute_uv=False)
    assert values[-1] == pytest.approx(reference[0], rel=1e-12)


def test_matrix_metric_on_one_dimensional_tensor_is_an_error_naming_the_layer():
    with pytest.raises(MetricInputError, match=r"layer 'layer.0' at step 7 has shape \(5,\)"):
        compute("stable_rank", torch.ones(5))
    assert math.isfinite(compute("gini", torch.arange(5.0)))


def test_bad_settings_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="norm_type"):
        METRICS.get("norm")(norm_type="L7")
    with pytest.raises(ValueError, match="unknown setting"):
        METRICS.get("gini")(threshold=1)
    with pytest.raises(KeyError, match="registered"):
        METRICS.get("no_such_metric")
