"""LDS and mislabel-detection utilities against brute-force references."""

import itertools

import numpy as np
import pytest
import torch

from analog.analysis import lds, mislabel_detection
from analog.analysis.evaluation import spearman


def brute_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of average ranks (ties share the mean of their positions)."""

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):
            r[x == value] = r[x == value].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_spearman_matches_brute_force_with_ties():
    gen = np.random.default_rng(0)
    a = gen.integers(0, 5, size=(30, 4)).astype(float)  # many ties
    b = gen.normal(size=(30, 4))
    got = spearman(torch.tensor(a), torch.tensor(b))
    expected = [brute_spearman(a[:, j], b[:, j]) for j in range(4)]
    assert len(expected) == 4
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_lds_of_a_perfect_linear_datamodel_is_one_and_of_its_negation_minus_one():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 20, generator=gen)
    masks = torch.rand(40, 20, generator=gen) < 0.5
    outputs = -(masks.double() @ scores.double().T)  # losses exactly as the scores predict
    assert lds(scores, masks, outputs)["lds"] == pytest.approx(1.0)
    assert lds(-scores, masks, outputs)["lds"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes"):
        lds(scores, masks[:, :5], outputs)


def test_mislabel_auc_and_recall_match_pairwise_counting():
    gen = np.random.default_rng(1)
    flipped = np.zeros(50, dtype=bool)
    flipped[gen.choice(50, 6, replace=False)] = True
    self_inf = gen.normal(size=50) + 1.5 * flipped
    out = mislabel_detection(torch.tensor(self_inf), torch.tensor(flipped), top_fraction=0.1)
    pairs = list(itertools.product(self_inf[flipped], self_inf[~flipped]))
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    top5 = np.argsort(-self_inf)[:5]
    assert len(pairs) == 6 * 44
    assert out["auc"] == pytest.approx(auc)
    assert out["k"] == 5 and out["found"] == int(flipped[top5].sum())
    assert out["recall"] == pytest.approx(flipped[top5].sum() / 6)
