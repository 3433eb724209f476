"""``hessian: True`` (= ``"auto"``): per module, raw where the store holds N ≥ k examples, K-FAC elsewhere.

Scores are checked against explicit references built without analog's fitting code: torch.func
per-sample gradients (projected by the project's P_out, P_in where LoGra compressed them), the raw
second moment F̂ = (1/N) Σ g gᵀ and the K-FAC matrix S ⊗ A formed as matrices and inverted.
"""

import pytest
import torch
from conftest import (
    MLP_MODULES,
    explicit_factors,
    flat_module_grads,
    loss_fn,
    make_data,
    make_mlp,
    per_sample_grads,
    query_log,
)

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.config import load_config


def test_true_means_auto_and_dense_is_refused_by_name():
    assert load_config({"hessian": True}).hessian == "auto"
    with pytest.raises(ValueError, match=r"hessian 'auto' uses Kronecker factors.*'raw', 'diagonal' or 'none'"):
        load_config({"hessian": True, "compression": {"type": "dense", "rank": 8}})


def _log(tmp_path, model, x, y, project="auto", hessian=True, **config):
    run = AnaLog(project, {"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 2},
                           "storage": {"dtype": "float32"}, "damping": 0.05, **config})
    run.update({"log": ["grad"], "hessian": hessian, "save": True})
    run.watch(model)
    for i in range(0, len(x), 16):
        with run(data_id=list(range(i, i + 16))):
            loss_fn(model(x[i : i + 16]), y[i : i + 16]).backward()
        model.zero_grad()
    run.eval()
    model.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run


def _projected(grads, module, p_out, p_in):
    """(B, r_out·r_in): P_outᵀ G P_in of the torch.func gradients, in analog's row-major layout."""
    g = flat_module_grads(grads, module).reshape(len(grads[f"{module}.weight"]), p_out.shape[0], p_in.shape[0])
    return torch.einsum("or,bos,sk->brk", p_out, g, p_in).reshape(len(g), -1)


def test_hessian_true_on_logra_fits_raw_equal_to_the_explicit_inverse(tmp_path):
    model = make_mlp()
    x, y = make_data(n=64)
    xq, yq = make_data(n=5, seed=3)
    run = _log(tmp_path, model, x, y)
    assert run.curvature.kind == "auto" and run.curvature.choices() == {"0": "raw", "2": "raw"}  # k = 4 <= 64
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores

    gt, gq = per_sample_grads(model, x, y), per_sample_grads(model, xq, yq)
    expected, compared = 0, 0
    for m in MLP_MODULES:
        p_out = run.projector.tensors[f"{m}/out"][0].double()
        p_in = run.projector.tensors[f"{m}/in"][0].double()
        t, q = _projected(gt, m, p_out, p_in), _projected(gq, m, p_out, p_in)
        fisher = t.T @ t / len(t)
        assert fisher.shape == (4, 4)  # rank 2 a side (every side compressed): 2 × 2 numbers per example
        expected = expected + q @ torch.linalg.inv(fisher + 0.05 * torch.eye(4, dtype=torch.float64)) @ t.T
        compared += 1
    assert compared == 2 and scores.shape == (5, 64)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-4, atol=1e-5)
    # a K-FAC fit of the same logs scores differently: the test tells the two apart
    twin = make_mlp()  # the same weights, watched by its own run
    kfac = _log(tmp_path, twin, x, y, project="kfac", hessian="kfac")
    assert kfac.curvature.kind == "kfac"
    assert not torch.allclose(kfac.influence.compute_influence_all(query_log(kfac, twin, xq, yq)).scores, scores,
                              rtol=1e-2)

    again = AnaLog("auto", {"root_dir": str(tmp_path), "hessian": True})  # reopened: the saved fit is used
    assert again.config.hessian == "auto"
    again.watch(model).eval()
    again.add_analysis({"influence": InfluenceFunction})
    torch.testing.assert_close(again.influence.compute_influence_all(query_log(again, model, xq, yq)).scores, scores)


def _mixed_reference(model, x, y, xq, yq):
    """Explicit float64 blocks of the uncompressed MLP's scores, from torch.func per-sample gradients:
    module "0" with K-FAC, kron(S, A) + λI (row-major vec(δ aᵀ) = δ ⊗ a), module "2" with raw, F̂ + λI
    (F̂ = (1/N) Σ g gᵀ), and module "0" with raw too (for the all-raw alternative); λ = 0.05."""
    gt, gq = per_sample_grads(model, x, y), per_sample_grads(model, xq, yq)
    t = {m: flat_module_grads(gt, m) for m in MLP_MODULES}
    q = {m: flat_module_grads(gq, m) for m in MLP_MODULES}
    a, s = explicit_factors(model, x, y)["0"]
    kfac = torch.kron(s, a)
    assert kfac.shape == (56, 56) and t["2"].shape[1] == 27

    def solve(m, curvature):
        eye = torch.eye(len(curvature), dtype=torch.float64)
        return q[m] @ torch.linalg.solve(curvature + 0.05 * eye, t[m].T)

    raw = {m: t[m].T @ t[m] / len(x) for m in MLP_MODULES}
    return {"0": solve("0", kfac), "2": solve("2", raw["2"]), "0 raw": solve("0", raw["0"])}


def test_modules_with_more_numbers_than_examples_keep_kfac(tmp_path):
    """Uncompressed MLP, N = 48: module "0" logs 8 × 7 = 56 > 48 numbers (K-FAC), "2" 3 × 9 = 27 (raw)."""
    model = make_mlp()
    x, y = make_data(n=48)
    xq, yq = make_data(n=4, seed=5)
    run = _log(tmp_path, model, x, y, project="mixed", compression={"type": "none"})
    assert run.curvature.choices() == {"0": "kfac", "2": "raw"}
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores.double()

    blocks = _mixed_reference(model, x, y, xq, yq)
    assert scores.shape == (4, 48)
    torch.testing.assert_close(scores, blocks["0"] + blocks["2"], rtol=2e-4, atol=1e-5)
    # either kind everywhere scores differently: the mix is what the test sees
    assert not torch.allclose(scores, blocks["2"] + blocks["0 raw"], rtol=1e-2)


def test_modules_whose_raw_sums_exceed_fit_bytes_keep_kfac_with_a_warning(tmp_path):
    """Uncompressed MLP, N = 64 ≥ k for both modules; fit_bytes = 10,000 holds module "2"'s 8 · 27² = 5,832
    bytes of sums but not module "0"'s 8 · 56² = 25,088: "0" keeps K-FAC (warned, by name), "2" is raw;
    scores are the explicit kron(S, A) and raw blocks summed."""
    model = make_mlp()
    x, y = make_data(n=64)
    xq, yq = make_data(n=4, seed=5)
    with pytest.warns(UserWarning, match=r"module\(s\) '0' keep K-FAC .* fit_bytes = 9\.8 KiB"):
        run = _log(tmp_path, model, x, y, project="capped", compression={"type": "none"}, fit_bytes=10_000)
        run.finalize()
    assert run.curvature.choices() == {"0": "kfac", "2": "raw"}
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores.double()
    blocks = _mixed_reference(model, x, y, xq, yq)
    assert scores.shape == (4, 64)
    torch.testing.assert_close(scores, blocks["0"] + blocks["2"], rtol=2e-4, atol=1e-5)


def test_without_a_store_every_module_is_kfac(tmp_path):
    model = make_mlp()
    x, y = make_data(n=32)
    run = AnaLog("nostore", {"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 2}})
    run.update({"log": ["grad"], "hessian": True, "save": False})
    run.watch(model)
    with run(data_id=list(range(32))):
        loss_fn(model(x), y).backward()
    model.zero_grad()
    run.finalize()
    assert run.curvature.kind == "auto" and run.curvature.choices() == {"0": "kfac", "2": "kfac"}


def test_a_project_fitted_with_kfac_reopens_with_true(tmp_path):
    x, y = make_data(n=32)
    # a project fitted with K-FAC before 'auto' existed (True was saved as "kfac") reopens with True
    old = _log(tmp_path, make_mlp(), x, y, project="old", hessian="kfac")  # LoGra logs, K-FAC asked
    assert old.curvature.kind == "kfac"
    again = AnaLog("old", {"root_dir": str(tmp_path), "hessian": True})
    assert again.config.hessian == "kfac"


@pytest.mark.parametrize("kind", ["raw", "none"])
def test_true_on_a_project_logged_with_another_kind_is_an_error_naming_both(tmp_path, kind):
    """Only "kfac" can be an older project's True; a project logged with another kind given True (auto) is
    refused like any other changed logging key, not reopened silently with the saved kind."""
    from analog.state import ProjectError

    x, y = make_data(n=32)
    _log(tmp_path, make_mlp(), x, y, project=kind, hessian=kind)
    with pytest.raises(ProjectError, match=f"hessian: saved '{kind}', given 'auto'"):
        AnaLog(kind, {"root_dir": str(tmp_path), "hessian": True})
    assert AnaLog(kind, {"root_dir": str(tmp_path)}).config.hessian == kind  # not given: the saved kind
