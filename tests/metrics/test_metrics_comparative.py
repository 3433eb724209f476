"""Known values of linear CKA, PWCCA and SVCCA, against closed forms and numpy references."""

import numpy as np
import pytest
import torch

from analog.metrics import MetricInputError, linear_cka, pwcca, svcca
from analog.metrics.comparative import cca


def _rng(seed=0):
    return np.random.default_rng(seed)


def _orthogonal(d, rng):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def _unbiased_hsic(k, gl):
    """Song et al. (2012) unbiased HSIC from Gram matrices with zeroed diagonals (numpy reference)."""
    n = k.shape[0]
    k, gl = k.copy(), gl.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(gl, 0)
    one = np.ones(n)
    term = (
        np.trace(k @ gl) + (one @ k @ one) * (one @ gl @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ gl @ one)
    )
    return term / (n * (n - 3))


def _cka_reference(x, y, debiased):
    x = x - x.mean(0)
    y = y - y.mean(0)
    k, gl = x @ x.T, y @ y.T
    if debiased:
        return _unbiased_hsic(k, gl) / np.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(gl, gl))
    return np.sum(k * gl) / np.sqrt(np.sum(k * k) * np.sum(gl * gl))


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_x_with_itself_is_one(debiased):
    x = torch.as_tensor(_rng().standard_normal((40, 7)))
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_gram_matrix_reference_with_different_widths(debiased):
    rng = _rng(1)
    x = rng.standard_normal((30, 5))
    y = x @ rng.standard_normal((5, 9)) + 0.7 * rng.standard_normal((30, 9))
    expected = _cka_reference(x, y, debiased)
    assert 0.05 < abs(expected) < 0.99  # a non-trivial value, so the comparison can fail
    assert linear_cka(torch.as_tensor(x), torch.as_tensor(y), debiased) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(torch.as_tensor(y), torch.as_tensor(x), debiased) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariant_to_orthogonal_maps_isotropic_scaling_and_shifts(debiased):
    rng = _rng(2)
    x = rng.standard_normal((50, 6))
    y = np.tanh(x @ rng.standard_normal((6, 4))) + 0.3 * rng.standard_normal((50, 4))
    base = linear_cka(torch.as_tensor(x), torch.as_tensor(y), debiased)
    transformed = 3.5 * x @ _orthogonal(6, rng) + rng.standard_normal(6) * 10
    y2 = 0.2 * y @ _orthogonal(4, rng) - 4.0
    assert linear_cka(torch.as_tensor(transformed), torch.as_tensor(y2), debiased) == pytest.approx(base, rel=1e-9)


def test_one_dimensional_cka_is_squared_correlation():
    rng = _rng(3)
    a = rng.standard_normal(100)
    b = 0.5 * a + rng.standard_normal(100)
    rho = np.corrcoef(a, b)[0, 1]
    assert linear_cka(torch.as_tensor(a[:, None]), torch.as_tensor(b[:, None])) == pytest.approx(rho**2, rel=1e-10)


def test_debiased_cka_near_zero_on_independent_high_dimensional_data_where_biased_is_near_one():
    rng = _rng(4)
    x = torch.as_tensor(rng.standard_normal((40, 4000)))
    y = torch.as_tensor(rng.standard_normal((40, 4000)))
    assert linear_cka(x, y, debiased=False) > 0.9
    assert abs(linear_cka(x, y, debiased=True)) < 0.05


def test_pwcca_of_x_with_itself_and_with_invertible_affine_map_is_one():
    rng = _rng(5)
    x = rng.standard_normal((200, 6))
    a = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    assert pwcca(torch.as_tensor(x), torch.as_tensor(x)) == pytest.approx(1.0, abs=1e-10)
    assert pwcca(torch.as_tensor(x), torch.as_tensor(x @ a + 5.0)) == pytest.approx(1.0, abs=1e-10)


def test_pwcca_invariant_to_invertible_affine_map_of_the_compared_side():
    rng = _rng(6)
    x = rng.standard_normal((300, 5))
    y = x[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((300, 4))
    a = rng.standard_normal((4, 4)) + 2 * np.eye(4)
    base = pwcca(torch.as_tensor(x), torch.as_tensor(y))
    assert 0.1 < base < 0.99
    assert pwcca(torch.as_tensor(x), torch.as_tensor(y @ a - 2.0)) == pytest.approx(base, rel=1e-9)


def test_one_dimensional_pwcca_is_absolute_correlation():
    rng = _rng(7)
    a = rng.standard_normal(80)
    b = -0.4 * a + rng.standard_normal(80)
    rho = np.corrcoef(a, b)[0, 1]
    assert rho < 0
    assert pwcca(torch.as_tensor(a[:, None]), torch.as_tensor(b[:, None])) == pytest.approx(abs(rho), rel=1e-10)


def test_canonical_correlations_match_numpy_whitening_reference_for_both_width_orders():
    rng = _rng(8)
    x = rng.standard_normal((400, 3))
    y = np.concatenate([x @ rng.standard_normal((3, 3)), rng.standard_normal((400, 4))], 1) + rng.standard_normal(
        (400, 7)
    )

    def reference(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        saa, sbb, sab = a.T @ a, b.T @ b, a.T @ b
        wa = np.linalg.inv(np.linalg.cholesky(saa))
        wb = np.linalg.inv(np.linalg.cholesky(sbb))
        return np.linalg.svd(wa @ sab @ wb.T, compute_uv=False)

    compared = 0
    for a, b in ((x, y), (y, x)):
        rho = cca(torch.as_tensor(a), torch.as_tensor(b))[0].numpy()
        ref = reference(a, b)[: rho.size]
        assert rho.size == 3
        np.testing.assert_allclose(rho, ref, rtol=1e-8)
        compared += 1
        value = pwcca(torch.as_tensor(a), torch.as_tensor(b))
        assert ref.min() - 1e-12 <= value <= ref.max() + 1e-12
    assert compared == 2


def test_svcca_keeps_variance_and_handles_different_widths():
    rng = _rng(9)
    x = rng.standard_normal((300, 8))
    y = x @ rng.standard_normal((8, 12))
    assert svcca(torch.as_tensor(x), torch.as_tensor(y), 0.999) == pytest.approx(1.0, abs=1e-8)
    z = rng.standard_normal((300, 12))
    assert svcca(torch.as_tensor(x), torch.as_tensor(z)) < 0.3


def test_too_few_samples_is_a_clear_error():
    rng = _rng(10)
    x, y = torch.as_tensor(rng.standard_normal((10, 6))), torch.as_tensor(rng.standard_normal((10, 6)))
    with pytest.raises(MetricInputError, match="more samples than the two ranks"):
        pwcca(x, y)
    with pytest.raises(MetricInputError, match="at least 4 samples"):
        linear_cka(x[:3], y[:3], debiased=True)
    with pytest.raises(MetricInputError, match="different numbers of samples"):
        linear_cka(x, y[:9])
