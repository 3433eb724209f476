"""Trajectory scores from per-segment stores and curvatures against explicit loops over checkpoints
(torch.func per-sample gradients at each checkpoint, explicitly inverted Fisher blocks)."""

import torch
from trajectory_helpers import MODULES, loss_fn, make_data, make_mlp, module_grads, perturbed

from analog import AnaLog
from analog.hessian import Curvature
from analog.storage import LogStore
from analog.trajectory import parameters_of, segment_scores, weighted_sum

LRS = [0.3, 0.2, 0.1]


def as_logged(model, grads):
    """torch.func gradients in the shape analog logs them: (B, groups=1, d_out, d_in + 1)."""
    dims = {"0": model[0], "2": model[2]}
    return {m: g.float().reshape(len(g), 1, dims[m].out_features, dims[m].in_features + 1) for m, g in grads.items()}


def log_at(model, params, x, y, root, project, hessian, ids):
    """Log (x, y) with the model's watched parameters set to ``params``: one single-segment project."""
    run = AnaLog(project, {"root_dir": str(root), "compression": {"type": "none"}, "hessian": hessian,
                           "progress": False})
    run.watch(model)
    with parameters_of(run.modules, params):
        for i in range(0, len(x), 8):
            with run(data_id=ids[i : i + 8]):
                loss_fn(model(x[i : i + 8]), y[i : i + 8]).backward()
            model.zero_grad()
        run.eval()
    return run


def test_tracin_cp_equals_an_explicit_loop_over_checkpoints(tmp_path):
    model, (x, y), (xq, yq) = make_mlp(), make_data(), make_data(n=4, seed=5)
    thetas = [perturbed(model, 0.3, seed=s) for s in range(3)]
    parts = []
    for s, theta in enumerate(thetas):
        # segment 2 saw only the first 16 examples: the others count zero there
        n = 16 if s == 2 else len(x)
        run = log_at(model, theta, x[:n], y[:n], tmp_path, f"cp{s}", "none", list(range(n)))
        query = as_logged(model, module_grads(model, xq, yq, theta))
        parts.append((LRS[s], segment_scores(query, LogStore(run.log_path))))
    ids, scores = weighted_sum(parts)

    expected = torch.zeros(4, len(x), dtype=torch.float64)
    for s, theta in enumerate(thetas):
        gq, gt = module_grads(model, xq, yq, theta), module_grads(model, x, y, theta)
        mask = torch.ones(len(x), dtype=torch.float64)
        if s == 2:
            mask[16:] = 0
        expected += LRS[s] * sum(gq[m] @ gt[m].T for m in MODULES) * mask
    assert ids == list(range(len(x))) and scores.shape == (4, 24)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


def test_segment_wise_curvature_equals_explicit_inverses_per_checkpoint(tmp_path):
    model, (x, y), (xq, yq) = make_mlp(), make_data(), make_data(n=3, seed=6)
    lam = 0.05
    thetas = [perturbed(model, 0.3, seed=10 + s) for s in range(2)]
    parts, expected = [], torch.zeros(3, len(x), dtype=torch.float64)
    for s, theta in enumerate(thetas):
        run = log_at(model, theta, x, y, tmp_path, f"raw{s}", "raw", list(range(len(x))))
        curvature = Curvature.load(run.state_path)
        query = as_logged(model, module_grads(model, xq, yq, theta))
        parts.append((LRS[s], segment_scores(query, LogStore(run.log_path), curvature, lam)))
        gq, gt = module_grads(model, xq, yq, theta), module_grads(model, x, y, theta)
        for m in MODULES:
            fisher = gt[m].T @ gt[m] / len(x)
            inverse = torch.linalg.inv(fisher + lam * torch.eye(len(fisher), dtype=torch.float64))
            expected += LRS[s] * gq[m] @ inverse @ gt[m].T
    ids, scores = weighted_sum(parts)
    assert len(parts) == 2 and scores.shape == (3, 24)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-4, atol=2e-4)


def test_weighted_sum_aligns_string_ids_in_order_of_first_appearance():
    a = (["x", "y"], torch.tensor([[1.0, 2.0]]))
    b = (["z", "x"], torch.tensor([[10.0, 20.0]]))
    ids, scores = weighted_sum([(0.5, a), (2.0, b)])
    assert ids == ["x", "y", "z"]
    torch.testing.assert_close(scores, torch.tensor([[0.5 + 40.0, 1.0, 20.0]]))
