"""Fits from the store under a memory budget (config ``fit_bytes``): modules in groups, one read of the
store per group, against an explicitly formed (F̂ + λI)⁻¹; raw's float32 eigenvectors and projects saved
with float64 ones; the warning when a module's raw covariance is rank-deficient (N < k)."""

import warnings

import pytest
import torch
from conftest import make_data, query_log, run_logging
from torch import nn

import analog.hessian.base as base
from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.hessian import build_curvature
from analog.hessian.simple import Raw

MODULES = ["0", "2", "4", "6"]
K = {"0": 5 * 7, "2": 4 * 6, "4": 3 * 5, "6": 3 * 4}  # d_out · (d_in + 1): [W | b] of each Linear
#: raw sums are 8k² bytes: 9800 | 4608 + 1800 = 6408 | 1152, so 6500 bytes makes three groups, the first
#: a module over the budget on its own
RAW_BUDGET, RAW_GROUPS = 6500, [["0"], ["2", "4"], ["6"]]
#: diagonal sums are 8k bytes: 280 | 192 | 120 + 96
DIAG_BUDGET, DIAG_GROUPS = 300, [["0"], ["2"], ["4", "6"]]
RANK_WARNING = "fewer than the logged dimension"


def deep_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(),
                         nn.Linear(3, 3))


@pytest.fixture
def reads(monkeypatch):
    """The modules of each read of the store made by a diagonal or raw fit, in order; each read in
    batches of 16 rows, so the sums add several batches."""
    seen = []
    inner = base.store_batches

    def counted(store, *args, modules=None, **kwargs):
        seen.append(list(modules))
        return inner(store, *args, modules=modules, **{**kwargs, "batch_size": 16})

    monkeypatch.setattr(base, "store_batches", counted)
    return seen


def explicit_fisher(store):
    """{module: F̂ = (1/N) GᵀG (k, k) float64} from every stored row at once (not through the fit)."""
    n = len(store)
    grads = {m: kinds["grad"].reshape(n, -1) for m, kinds in store.split(store.rows(0, n).double()).items()}
    return {m: g.T @ g / n for m, g in grads.items()}


def test_raw_fitted_in_groups_under_fit_bytes_equals_the_explicit_inverse(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(Raw, "EVECS_DTYPE", torch.float64)  # the fit as computed, to float64 precision
    lam = 0.05
    with pytest.warns(UserWarning, match=r"module\(s\) '0' \(9\.6 KiB = 9800 bytes\) exceed fit_bytes = "
                                         r"6\.3 KiB = 6500 bytes; each is fitted alone") as record:
        run = run_logging(deep_mlp(), *make_data(n=48), tmp_path, "raw", "raw", damping=lam,
                          config={"fit_bytes": RAW_BUDGET})
    assert reads == RAW_GROUPS
    assert not [w for w in record if RANK_WARNING in str(w.message)]  # N = 48 ≥ every k

    fisher = explicit_fisher(run.open_store())
    gen = torch.Generator().manual_seed(3)
    compared = []
    for m in MODULES:
        assert fisher[m].shape == (K[m], K[m])
        g = torch.randn(5, K[m], generator=gen, dtype=torch.float64)
        expected = torch.linalg.solve(fisher[m] + lam * torch.eye(K[m], dtype=torch.float64), g.T).T
        torch.testing.assert_close(run.curvature.precondition(m, g, lam), expected, rtol=1e-10, atol=1e-12)
        compared.append(m)
    assert compared == run.curvature.modules() == MODULES


@pytest.mark.parametrize("kind, budget, groups", [("raw", RAW_BUDGET, RAW_GROUPS),
                                                  ("diagonal", DIAG_BUDGET, DIAG_GROUPS)])
def test_a_fit_in_groups_equals_the_fit_in_one_read(tmp_path, reads, kind, budget, groups):
    run = run_logging(deep_mlp(), *make_data(n=48), tmp_path, kind, kind)  # default fit_bytes: one read
    assert reads == [MODULES]
    store = run.open_store()
    grouped = build_curvature(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # raw: module '0' is over the budget
        grouped.finalize(store, fit_bytes=budget)
    assert reads[1:] == groups
    keys = sorted(run.curvature.state)
    assert sorted(grouped.state) == keys and len(keys) == (8 if kind == "raw" else 4)
    for key in keys:
        assert torch.equal(grouped.state[key], run.curvature.state[key]), key
    if kind == "diagonal":  # diag(F̂), by the formula
        fisher = explicit_fisher(store)
        for m in MODULES:
            torch.testing.assert_close(grouped.state[f"{m}/diag"], fisher[m].diagonal(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["raw", "diagonal"])
def test_fit_bytes_is_a_runtime_key_checked_like_flush_bytes(tmp_path, kind):
    with pytest.raises(ValueError, match="config 'fit_bytes' must be a positive number of bytes, got 0"):
        AnaLog("p", {"root_dir": str(tmp_path), "hessian": kind, "fit_bytes": 0})
    assert AnaLog("q", {"root_dir": str(tmp_path), "hessian": kind, "fit_bytes": 1e6}).config.fit_bytes == 10**6
    for bad in (float("inf"), float("nan"), True):  # inf: no integer of bytes (int(inf) overflows)
        with pytest.raises(ValueError, match=f"config 'fit_bytes' must be a positive number of bytes, got {bad!r}"):
            AnaLog("r", {"root_dir": str(tmp_path), "hessian": kind, "fit_bytes": bad})


def test_fit_bytes_can_be_lowered_after_logging_before_finalize(tmp_path, reads):
    """fit_bytes says nothing about what was logged: update() accepts it once logging started, and the fit
    that follows reads the store in the groups of the new budget."""
    model = deep_mlp()
    x, y = make_data(n=48)
    run = AnaLog("lowered", {"root_dir": str(tmp_path), "hessian": "diagonal", "compression": {"type": "none"}})
    run.watch(model)
    for i in range(0, 48, 16):
        with run(data_id=list(range(i, i + 16))):
            nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16], reduction="sum").backward()
        model.zero_grad()
    run.update({"fit_bytes": DIAG_BUDGET})
    assert run.config.fit_bytes == DIAG_BUDGET
    run.finalize()
    assert reads == DIAG_GROUPS


def test_raw_warns_when_a_module_has_more_logged_dimensions_than_the_project_has_examples(tmp_path):
    # N = 20 < k for '0' (35) and '2' (24); not for '4' (15) and '6' (12)
    with pytest.warns(UserWarning, match=r"N = 20 examples, fewer than the logged dimension k of module\(s\) "
                                         r"'0' \(k = 35\), '2' \(k = 24\): their F̂ = \(1/N\) Σ g gᵀ has rank at "
                                         r"most N") as record:
        run = run_logging(deep_mlp(), *make_data(n=20), tmp_path, "few", "raw")
    messages = [str(w.message) for w in record if RANK_WARNING in str(w.message)]
    assert len(messages) == 1 and "'4'" not in messages[0] and "'6'" not in messages[0]
    for m in ("0", "2"):  # what it says: at most N nonzero eigenvalues
        evals = run.curvature.state[f"{m}/evals"]
        assert len(evals) == K[m] and int((evals > 1e-12 * evals.max()).sum()) <= 20


@pytest.mark.parametrize("kind, n", [("raw", 35), ("diagonal", 20)])
def test_no_rank_warning_with_at_least_k_examples_or_for_the_diagonal(tmp_path, kind, n):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run = run_logging(deep_mlp(), *make_data(n=n), tmp_path, "enough", kind)
    assert run.curvature.meta["n_samples"] == n and run.curvature.modules() == MODULES
    assert [str(w.message) for w in record if RANK_WARNING in str(w.message)] == []


def test_raw_stores_float32_eigenvectors_and_a_float64_project_scores_as_it_did(tmp_path, monkeypatch):
    """A project saved by analog before eigenvectors were stored in float32: the same fit with float64
    Q, written into the project's state; reopened, it is read and used in float64 as it was."""
    model, (x, y), (xq, yq) = deep_mlp(), make_data(n=48), make_data(n=4, seed=2)
    lam = 0.05
    run = run_logging(model, x, y, tmp_path, "p", "raw", damping=lam)
    assert [run.curvature.state[f"{m}/evecs"].dtype for m in MODULES] == [torch.float32] * 4
    assert [run.curvature.state[f"{m}/evals"].dtype for m in MODULES] == [torch.float64] * 4
    q = query_log(run, model, xq, yq)
    new_scores = run.influence.compute_influence_all(q).scores

    store = run.open_store()
    monkeypatch.setattr(Raw, "EVECS_DTYPE", torch.float64)
    old = build_curvature("raw")
    old.finalize(store)
    monkeypatch.undo()
    old_scores = InfluenceFunction.from_parts(old, store, lam).compute_influence_all(q).scores
    run.state.save(run.config, None, old)

    reopened = AnaLog("p", {"root_dir": str(tmp_path)})
    reopened.watch(model)
    reopened.eval()
    reopened.add_analysis({"influence": InfluenceFunction})
    state = reopened.curvature.state
    assert sorted(state) == sorted(old.state) and len(state) == 8
    for key in state:
        assert state[key].dtype == torch.float64 and torch.equal(state[key], old.state[key]), key
    scores = reopened.influence.compute_influence_all(query_log(reopened, model, xq, yq)).scores
    assert scores.shape == (4, 48) and torch.equal(scores, old_scores)

    # both equal the explicit Σ_m g_q,m (F̂_m + λI)⁻¹ g_t,m: float64 Q to float32 output rounding, float32 Q
    # to what rounding Q to float32 adds (measured: benchmarks/bench_raw_evecs.py)
    fisher, n = explicit_fisher(store), len(store)
    logs = store.split(store.rows(0, n).double())
    train = {m: kinds["grad"].reshape(n, -1) for m, kinds in logs.items()}
    queries = {m: kinds["grad"].reshape(4, -1).double() for m, kinds in q[1].items()}
    expected = sum(torch.linalg.solve(fisher[m] + lam * torch.eye(K[m], dtype=torch.float64), queries[m].T).T
                   @ train[m].T for m in MODULES)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    torch.testing.assert_close(new_scores.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
