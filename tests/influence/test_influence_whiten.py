"""Precondition, then project (LoGra ``init="whiten"``/``"whiten_pca"``) against explicit references.

References are built without analog: per-sample gradients by torch.func, the K-FAC factors
A = (1/N) Σ [x, 1][x, 1]ᵀ from the layer inputs and S = (1/N) Σ δ δᵀ from the per-sample bias
gradients (δ = ∂ℓ/∂y for a Linear layer on one position), the damping split by traces, and the
preconditioned inner product gᵀ (S_λ ⊗ A_λ)⁻¹ g′ by an explicitly formed Kronecker matrix and a solve.
"""

import math

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
    reference_scores,
    split,
)

from analog import AnaLog, AnaLogScheduler
from analog.analysis import InfluenceFunction
from analog.compression.logra import LoGraProjector
from analog.compression.whiten import spread_bound
from analog.hessian import CurvatureError
from analog.state import ProjectError

MODULES = MLP_MODULES


def flat(model, x, y):
    grads = per_sample_grads(model, x, y)
    return {m: flat_module_grads(grads, m) for m in MODULES}


def whitened_run(root, model, x, y, compression, hessian="none"):
    # float32 store: scores over the stored rows are compared with explicit products to 2e-4
    run = AnaLog("w", {"root_dir": str(root), "compression": compression, "progress": False,
                       "storage": {"dtype": "float32"}})
    run.update({"hessian": hessian})
    run.watch(model)
    passes = 0
    for _ in AnaLogScheduler(run):
        passes += 1
        for i in range(0, len(x), 16):
            with run(data_id=list(range(i, min(i + 16, len(x))))):
                loss_fn(model(x[i : i + 16]), y[i : i + 16]).backward()
            model.zero_grad()
    assert passes == 2  # statistics, then logging
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run


def compressed(p_out, p_in, g, shape):
    """⟨·,·⟩-ready P_outᵀ G P_in of flat gradients g (B, d_out·d_in), as (B, r_out·r_in) float64."""
    G = g.reshape(len(g), *shape)
    return (p_out.T @ G @ p_in).reshape(len(g), -1)


@pytest.fixture
def setup():
    x, y = make_data(n=64)
    model = make_mlp().eval()
    xq, yq = make_data(n=5, seed=1)
    return model, x, y, xq, yq, explicit_factors(model, x, y)


def test_full_rank_whitening_equals_kfac_preconditioned_product(tmp_path, setup):
    """Rank >= width on both sides: the logged dot products are exactly gᵀ(S_λ ⊗ A_λ)⁻¹g′."""
    model, x, y, xq, yq, factors = setup
    run = whitened_run(tmp_path, model, x, y, {"type": "logra", "rank": 100, "init": "whiten"})
    got = run.influence.compute_influence_all(query_log(run, model, xq, yq), per_module=True)
    ref = reference_scores(factors, flat(model, xq, yq), flat(model, x, y))
    for m in MODULES:
        torch.testing.assert_close(got.per_module[m].double(), ref[m], rtol=2e-4, atol=1e-5)
    assert len(got.per_module) == 2 and got.scores.shape == (5, 64)


def test_whiten_expectation_over_seeds_and_spread_bound(tmp_path, setup):
    """E over seeds of the compressed score = the explicit preconditioned product; per-pair spread
    over 400 seeds within the module docstring's bound (the seed-0 run is checked end to end)."""
    model, x, y, xq, yq, factors = setup
    rank = {"0": [3, 4], "2": [2, 5]}
    run = whitened_run(tmp_path, model, x, y, {"type": "logra", "rank": rank, "init": "whiten", "seed": 0})
    gq, gt = flat(model, xq, yq), flat(model, x[:12], y[:12])
    ref = reference_scores(factors, gq, gt)
    # analog's statistics pass fitted the same factors: its P equal those built from the explicit factors
    mine = LoGraProjector(rank=rank, seed=0, init="whiten")
    mine.setup(run.dims)
    mine.fit({m: {"in": a[None], "out": s[None]} for m, (a, s) in factors.items()})
    for key, p in run.projector.tensors.items():
        torch.testing.assert_close(p, mine.tensors[key], rtol=1e-3, atol=1e-5)
    logged = run.influence.compute_influence_all(query_log(run, model, xq, yq), per_module=True)
    compared = 0
    for m in MODULES:
        (_, d_out, d_in), (a, s) = run.dims[m], factors[m]
        p_out, p_in = mine.tensors[f"{m}/out"][0].double(), mine.tensors[f"{m}/in"][0].double()
        seed0 = compressed(p_out, p_in, gq[m], (d_out, d_in)) @ compressed(p_out, p_in, gt[m], (d_out, d_in)).T
        torch.testing.assert_close(logged.per_module[m][:, :12].double(), seed0, rtol=1e-3, atol=1e-4)
        # P = root · R: the full-rank fit gives the roots, the random init of each seed gives R
        full = LoGraProjector(rank=100, init="whiten")
        full.setup({m: run.dims[m]})
        full.fit({m: {"in": a[None], "out": s[None]}})
        root_out, root_in = full.tensors[f"{m}/out"][0].double(), full.tensors[f"{m}/in"][0].double()
        samples = []
        for seed in range(400):
            r = LoGraProjector(rank=rank, seed=seed)
            r.setup({m: run.dims[m]})
            po, pi = root_out @ r.tensors[f"{m}/out"][0].double(), root_in @ r.tensors[f"{m}/in"][0].double()
            if seed == 0:
                torch.testing.assert_close(po, p_out, rtol=1e-4, atol=1e-5)
            samples.append(compressed(po, pi, gq[m], (d_out, d_in)) @ compressed(po, pi, gt[m], (d_out, d_in)).T)
        samples = torch.stack(samples)
        # ‖G̃‖ of each example: the reference self-product
        nq = reference_scores({m: factors[m]}, gq, gq)[m].diagonal().sqrt()
        nt = reference_scores({m: factors[m]}, gt, gt)[m].diagonal().sqrt()
        bound = spread_bound(nq[:, None], nt[None, :], *rank[m])
        assert (samples.std(0) <= 1.1 * bound).all()
        assert ((samples.mean(0) - ref[m]).abs() <= 5 * bound / math.sqrt(len(samples))).all()
        compared += samples.shape[1] * samples.shape[2]
    assert compared == 2 * 5 * 12


def test_whiten_pca_is_the_truncated_preconditioned_product(setup):
    """``whiten_pca``: exactly gᵀ (Q_S,r diag(1/(s+λ_S)) Q_S,rᵀ ⊗ Q_A,r diag(1/(α+λ_A)) Q_A,rᵀ) g′."""
    model, x, y, xq, yq, factors = setup
    dims = {"0": (1, 8, 7), "2": (1, 3, 9)}
    p = LoGraProjector(rank=[2, 4], init="whiten_pca")
    p.setup(dims)
    assert p.needs_fit()
    p.fit({m: {"in": a[None], "out": s[None]} for m, (a, s) in factors.items()})
    gq, gt = flat(model, xq, yq), flat(model, x, y)
    for m, (a, s) in factors.items():
        lam_a, lam_s = split(a, s)
        mats = []
        for factor, lam, r in ((s, lam_s, 2), (a, lam_a, 4)):
            e, q = torch.linalg.eigh(factor)
            r = min(r, len(factor))
            mats.append(q[:, -r:] @ torch.diag(1 / (e[-r:] + lam)) @ q[:, -r:].T)
        ref = gq[m] @ torch.kron(*mats) @ gt[m].T
        _, d_out, d_in = dims[m]
        po, pi = p.tensors[f"{m}/out"][0].double(), p.tensors[f"{m}/in"][0].double()
        got = compressed(po, pi, gq[m], (d_out, d_in)) @ compressed(po, pi, gt[m], (d_out, d_in)).T
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert p.tensors["2/out"].shape == (1, 3, 2) and p.tensors["0/in"].shape == (1, 7, 4)


def test_whitened_projection_saved_and_refused_on_mismatch(tmp_path, setup):
    model, x, y, xq, yq, _ = setup
    comp = {"type": "logra", "rank": 3, "init": "whiten"}
    run = whitened_run(tmp_path, model, x, y, comp, hessian="kfac")
    before = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores
    again = AnaLog("w", {"root_dir": str(tmp_path), "compression": comp, "hessian": "kfac"}).watch(model)
    assert again.phase == "log"  # the fitted projections were restored: no statistics pass again
    again.eval().add_analysis({"influence": InfluenceFunction})
    torch.testing.assert_close(again.influence.compute_influence_all(query_log(again, model, xq, yq)).scores, before)
    with pytest.raises(ProjectError, match="compression.damping"):  # another whitening λ: refused, named
        other = {"root_dir": str(tmp_path), "compression": {**comp, "damping": 0.5}, "hessian": "kfac"}
        AnaLog("w", other).watch(model)


def test_statistics_pass_without_data_or_gradient_is_a_clear_error(tmp_path, setup):
    model, x, y, _, _, _ = setup
    run = AnaLog("e", {"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 2, "init": "whiten"}})
    run.watch(model)
    with pytest.raises(RuntimeError, match="statistics pass"):
        run.next_pass()  # no data seen
    with run(data_id=list(range(8))):
        model[0](x[:8]).sum().backward()  # module "2" is never reached
    model.zero_grad()
    with pytest.raises(ValueError, match=r"\['2'\]"):
        run.next_pass()


def test_zero_factor_and_zero_damping_are_refused():
    p = LoGraProjector(rank=2, init="whiten", damping=None)
    p.setup({"fc": (1, 3, 4)})
    zero_s = {"fc": {"in": torch.eye(4)[None].double(), "out": torch.zeros(1, 3, 3, dtype=torch.float64)}}
    with pytest.raises(CurvatureError, match="'fc'.*output-gradient"):
        p.fit(zero_s)
    # singular but non-zero factors are fine: the damping makes them invertible (the documented fallback)
    singular = {"fc": {"in": torch.diag(torch.tensor([1.0, 0, 0, 0]))[None].double(),
                       "out": torch.diag(torch.tensor([2.0, 0, 0]))[None].double()}}
    p.fit(singular)
    assert torch.isfinite(p.tensors["fc/in"]).all() and p.tensors["fc/in"].shape == (1, 4, 2)
    with pytest.raises(ValueError, match="compression.damping"):
        AnaLog("z", {"compression": {"init": "whiten", "damping": 0.0}})


def _objective(energies, ranks):
    return sum(float(energies[m][0][r[0]] * energies[m][1][r[1]]) for m, r in ranks.items())


def test_spectrum_allocation_against_exhaustive_search():
    """Greedy ranks stay within budget and dimensions and reach ≥ 95 % of the exhaustive optimum."""
    from itertools import product

    from analog.compression.allocate import allocate

    gen = torch.Generator().manual_seed(0)
    compared = 0
    for trial in range(6):
        energies, groups = {}, {"a": 1, "b": 2}
        for m, (d_out, d_in) in {"a": (5, 7), "b": (4, 6)}.items():
            sides = []
            for d in (d_out, d_in):
                w = torch.rand(d, generator=gen, dtype=torch.float64) ** (1 + 3 * trial / 5)
                sides.append(torch.cat([torch.zeros(1, dtype=torch.float64), w.sort(descending=True).values.cumsum(0)]))
            energies[m] = tuple(sides)
        budget = 30
        got = allocate(energies, groups, budget)
        assert sum(groups[m] * r[0] * r[1] for m, r in got.items()) <= budget
        best = max(_objective(energies, {"a": (ao, ai), "b": (bo, bi)})
                   for ao, ai, bo, bi in product(range(1, 6), range(1, 8), range(1, 5), range(1, 7))
                   if ao * ai + 2 * bo * bi <= budget)
        assert _objective(energies, got) >= 0.95 * best
        compared += 1
    assert compared == 6


def test_spectrum_allocation_end_to_end(tmp_path, setup):
    """allocate: spectrum moves rank to the flatter side, logs at the allocated shapes, reopens."""
    model, x, y, xq, yq, _ = setup
    comp = {"type": "logra", "rank": 3, "init": "whiten_pca", "allocate": "spectrum"}
    run = whitened_run(tmp_path, model, x, y, comp, hessian="kfac")
    ranks = run.projector.ranks
    assert sum(r_out * r_in for r_out, r_in in ranks.values()) <= 2 * 9  # the budget of rank 3 everywhere
    assert ranks != {"0": (3, 3), "2": (3, 3)}
    store = run.open_store()
    shapes = {f["module"]: tuple(f["shape"]) for f in store.fields}
    assert shapes == {m: (1, r_out, r_in) for m, (r_out, r_in) in ranks.items()}
    scores = run.influence.compute_influence_all(query_log(run, model, xq, yq)).scores
    again = AnaLog("w", {"root_dir": str(tmp_path), "compression": comp, "hessian": "kfac"}).watch(model)
    assert again.projector.grad_shape("0", again.dims["0"]) == (1, *ranks["0"])
    again.eval().add_analysis({"influence": InfluenceFunction})
    torch.testing.assert_close(again.influence.compute_influence_all(query_log(again, model, xq, yq)).scores, scores)
    with pytest.raises(ValueError, match="allocate"):
        AnaLog("bad", {"compression": {"init": "random", "allocate": "spectrum"}})


def test_finalize_after_only_a_statistics_pass_is_an_error(tmp_path, setup):
    """A plain loop (no scheduler) with a fitted init only gathers statistics: finalize says so."""
    model, x, y, _, _, _ = setup
    run = AnaLog("p", {"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 2, "init": "whiten"}})
    run.watch(model)
    with run(data_id=list(range(16))):
        loss_fn(model(x[:16]), y[:16]).backward()
    model.zero_grad()
    with pytest.raises(RuntimeError, match="statistics pass and nothing was logged"):
        run.finalize()
    run.next_pass()
    with run(data_id=list(range(16))):
        loss_fn(model(x[:16]), y[:16]).backward()
    model.zero_grad()
    run.finalize()
    assert len(run.open_store()) == 16
