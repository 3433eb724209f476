"""Attribution against subset retraining on scikit-learn's bundled digits (no download).

Measured on this task (50 subsets of 50 %, L2-regularised logistic regression trained to
convergence by L-BFGS, 300 train / 30 test, heuristic damping): LDS 0.85 (K-FAC), 0.83 (EK-FAC),
0.45 (identity), random scores −0.004. The thresholds leave a wide margin below the measured
values and far above what random scores reach, so replacing attribution by noise fails the test.
"""

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.analysis import InfluenceFunction, lds

WEIGHT_DECAY = 1e-3


def train(x, y):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        penalty = sum((p**2).sum() for p in model.parameters())
        loss = nn.functional.cross_entropy(model(x), y) + WEIGHT_DECAY / 2 * penalty
        loss.backward()
        return loss

    opt.step(closure)
    return model


@pytest.fixture(scope="module")
def digits_task():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = x[perm[:300]], y[perm[:300]], x[perm[300:330]], y[perm[300:330]]
    masks = torch.rand(50, 300, generator=torch.Generator().manual_seed(1)) < 0.5
    outputs = []
    for mask in masks:
        model = train(xtr[mask], ytr[mask])
        with torch.no_grad():
            outputs.append(nn.functional.cross_entropy(model(xte), yte, reduction="none"))
    return train(xtr, ytr), xtr, ytr, xte, yte, masks, torch.stack(outputs)


@pytest.mark.parametrize("hessian,threshold", [("kfac", 0.6), ("ekfac", 0.6), ("none", 0.25)])
def test_lds_above_threshold_and_random_scores_fail_it(digits_task, tmp_path, hessian, threshold):
    model, xtr, ytr, xte, yte, masks, outputs = digits_task
    run = AnaLog("lds", {"root_dir": str(tmp_path), "compression": {"type": "none"}})
    run.update({"hessian": hessian})
    run.watch(model)
    for i in range(0, 300, 100):
        with run(data_id=list(range(i, i + 100))):
            nn.functional.cross_entropy(model(xtr[i : i + 100]), ytr[i : i + 100], reduction="sum").backward()
        model.zero_grad()
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    with run():
        nn.functional.cross_entropy(model(xte), yte, reduction="sum").backward()
    scores = run.influence.compute_influence_all(run.get_log()).scores
    assert scores.shape == (30, 300)
    assert lds(scores, masks, outputs)["lds"] > threshold
    random_lds = lds(torch.randn(30, 300, generator=torch.Generator().manual_seed(3)), masks, outputs)["lds"]
    assert abs(random_lds) < 0.15
    assert lds(-scores, masks, outputs)["lds"] < -threshold  # the sign convention matters
