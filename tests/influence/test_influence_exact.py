"""Influence scores against exact references built without analog's code paths."""

import torch
from conftest import flat_module_grads, make_data, per_sample_grads, query_log, run_logging
from torch import nn

MODULES = ["0", "2"]


def test_identity_scores_equal_torch_func_gradient_dots(tiny, tmp_path):
    model, x, y = tiny
    run = run_logging(model, x, y, tmp_path, "identity", "none")
    xq, yq = make_data(n=5, seed=1)
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores

    ref_q, ref_t = per_sample_grads(model, xq, yq), per_sample_grads(model, x, y)
    flat = lambda g: torch.cat([g[k].reshape(g[k].shape[0], -1) for k in sorted(g)], 1)  # noqa: E731
    expected = flat(ref_q) @ flat(ref_t).T
    assert len(ref_q) == 4 and scores.shape == (5, 48)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def explicit_fisher(model, x, y):
    """Block-diagonal empirical Fisher {module: (D, D)}, F = (1/N) Σ g gᵀ, from torch.func grads."""
    g = per_sample_grads(model, x, y)
    return {m: flat_module_grads(g, m).T @ flat_module_grads(g, m) / len(x) for m in MODULES}


def explicit_scores(model, x, y, xq, yq, inverse):
    gq, gt = per_sample_grads(model, xq, yq), per_sample_grads(model, x, y)
    return sum(flat_module_grads(gq, m) @ inverse[m] @ flat_module_grads(gt, m).T for m in MODULES)


def test_raw_equals_explicit_empirical_fisher_inverse(tiny, tmp_path):
    model, x, y = tiny
    lam = 0.05
    run = run_logging(model, x, y, tmp_path, "raw", "raw", damping=lam)
    xq, yq = make_data(n=4, seed=2)
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores

    fisher = explicit_fisher(model, x, y)
    inverse = {m: torch.linalg.inv(f + lam * torch.eye(len(f), dtype=f.dtype)) for m, f in fisher.items()}
    assert len(inverse) == 2 and all(len(f) > 0 for f in fisher.values())
    torch.testing.assert_close(scores.double(), explicit_scores(model, x, y, xq, yq, inverse), rtol=2e-4, atol=1e-4)


def test_raw_on_a_single_layer_with_a_thousand_parameters_uses_the_full_fisher(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40))  # 1000 parameters, one block = the whole Fisher
    x, y = torch.randn(80, 24), torch.randint(0, 40, (80,))
    lam = 0.1
    run = run_logging(model, x, y, tmp_path, "raw1", "raw", damping=lam)
    xq, yq = torch.randn(3, 24), torch.randint(0, 40, (3,))
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores
    g = per_sample_grads(model, x, y)
    f = flat_module_grads(g, "0").T @ flat_module_grads(g, "0") / len(x)
    assert f.shape == (1000, 1000)
    inv = {"0": torch.linalg.inv(f + lam * torch.eye(1000, dtype=f.dtype))}
    gq = per_sample_grads(model, xq, yq)
    expected = flat_module_grads(gq, "0") @ inv["0"] @ flat_module_grads(g, "0").T
    torch.testing.assert_close(scores.double(), expected, rtol=5e-4, atol=1e-4)


def kfac_factors(model, x, y, module_index):
    """A = (1/N) Σ [a;1][a;1]ᵀ and S = (1/N) Σ δδᵀ of one Linear, from explicit forward/backward."""
    acts, grads = {}, {}
    layer = model[module_index]

    def keep_input(module, inputs, output):
        acts["a"] = inputs[0].detach()

    def keep_output_grad(module, grad_in, grad_out):
        grads["d"] = grad_out[0].detach()

    h1 = layer.register_forward_hook(keep_input)
    h2 = layer.register_full_backward_hook(keep_output_grad)
    # the per-example output gradient δ of a sum-reduced loss is the batch output gradient row
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    h1.remove(), h2.remove()
    model.zero_grad()
    a = torch.cat([acts["a"], torch.ones(len(x), 1)], 1).double()
    d = grads["d"].double()
    return a.T @ a / len(x), d.T @ d / len(x)


def test_kfac_on_a_single_linear_layer_equals_explicit_kronecker_inverse(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4))
    x, y = torch.randn(40, 5), torch.randint(0, 4, (40,))
    lam = 0.02
    run = run_logging(model, x, y, tmp_path, "kfac", "kfac", damping=lam)
    xq, yq = torch.randn(3, 5), torch.randint(0, 4, (3,))
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores

    a, s = kfac_factors(model, x, y, 0)
    h = torch.kron(s, a)  # row-major vec of the (d_out, d_in + 1) gradient
    inv = torch.linalg.inv(h + lam * torch.eye(len(h), dtype=h.dtype))
    gq, gt = per_sample_grads(model, xq, yq), per_sample_grads(model, x, y)
    expected = flat_module_grads(gq, "0") @ inv @ flat_module_grads(gt, "0").T
    assert h.shape == (24, 24)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-4, atol=1e-4)


def test_ekfac_corrected_eigenvalues_are_the_diagonal_of_the_rotated_fisher(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    run = run_logging(model, x, y, tmp_path, "ekfac", "ekfac", damping=0.01)
    g = per_sample_grads(model, x, y)
    compared = 0
    for m in MODULES:
        q_s, q_a = run.curvature.state[f"{m}/QS"][0], run.curvature.state[f"{m}/QA"][0]
        fisher = flat_module_grads(g, m).T @ flat_module_grads(g, m) / len(x)
        q = torch.kron(q_s, q_a)
        expected = torch.diagonal(q.T @ fisher @ q).reshape(q_s.shape[0], q_a.shape[0])
        torch.testing.assert_close(run.curvature.state[f"{m}/corrected"][0], expected, rtol=1e-6, atol=1e-9)
        compared += 1
    assert compared == 2
