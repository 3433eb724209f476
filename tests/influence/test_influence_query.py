"""LoGra ``init="query"`` (analog.compression.query) against references built without analog.

References: K-FAC factors from the layer inputs and per-sample output gradients (A averaged over
positions, S over examples, as analog.hessian.kfac), the π-split damping and the inverse roots
R = (M + λI)^{-1/2} by an eigendecomposition, per-query gradients by torch.func, the whitened Grams
M_out = Σ_b Q̃_b Q̃_bᵀ, M_in = Σ_b Q̃_bᵀ Q̃_b of Q̃_b = R_S Q_b R_A formed from them, and the
K-FAC-preconditioned inner products by an explicit Kronecker matrix and a solve.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
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
from torch import nn
from torch.func import functional_call, grad, vmap

from analog import AnaLog, AnaLogScheduler
from analog.analysis import InfluenceFunction
from analog.compression.query import QueryGrams


def inverse_root(m, lam):
    e, q = torch.linalg.eigh(m + lam * torch.eye(len(m), dtype=m.dtype))
    return q @ torch.diag(e.rsqrt()) @ q.T


def reference_grams(a, s, grads):
    """(R_A, R_S, M_out, M_in) from factors A, S (float64) and per-query gradients (B, d_out, d_in)."""
    lam_a, lam_s = split(a, s)
    root_a, root_s = inverse_root(a, lam_a), inverse_root(s, lam_s)
    white = root_s @ grads.double() @ root_a
    return root_a, root_s, (white @ white.mT).sum(0), (white.mT @ white).sum(0)


def top(m, r):
    return torch.linalg.eigh(m)[1][:, -r:]


def flat(model, x, y):
    grads = per_sample_grads(model, x, y)
    return {m: flat_module_grads(grads, m) for m in MLP_MODULES}


def query_run(root, model, x, y, xq, yq, rank, project="q", hessian="none"):
    """Statistics pass and log pass over (x, y), query pass over (xq, yq), all under AnaLogScheduler."""
    # float32 store: scores over the stored rows are compared with explicit products to 1e-4
    run = AnaLog(project, {"root_dir": str(root), "compression": {"type": "logra", "rank": rank, "init": "query"},
                           "hessian": hessian, "progress": False, "storage": {"dtype": "float32"}})
    run.watch(model)
    phases = []
    for phase in AnaLogScheduler(run):
        phases.append(phase)
        if phase == "query":
            with run():
                loss_fn(model(xq), yq).backward()
        else:
            for i in range(0, len(x), 10):
                with run(data_id=list(range(i, min(i + 10, len(x))))):
                    loss_fn(model(x[i : i + 10]), y[i : i + 10]).backward()
                model.zero_grad()
        model.zero_grad()
    return run, phases


def scores(run, model, xq, yq):
    run.eval()
    if "influence" not in run.analyses:
        run.add_analysis({"influence": InfluenceFunction})
    return run.influence.compute_influence_all(query_log(run, model, xq, yq), per_module=True)


@pytest.fixture
def data():
    x, y = make_data(n=40)
    xq, yq = make_data(n=5, seed=1)
    return x, y, xq, yq


def test_fitted_projections_equal_explicit_reference(tmp_path, data):
    """P_side = R_side · top-r eigenvectors of the whitened query Gram, every module and side; and the
    scores of other queries equal the reference projections' (both invariant to the eigenvectors' signs)."""
    x, y, xq, yq = data
    model = make_mlp(h=5).eval()  # 6 → 5 → 3: (d_out, d_in) = (5, 7) and (3, 6); rank 2 compresses every side
    run, phases = query_run(tmp_path, model, x, y, xq, yq, rank=2)
    assert phases == ["pca", "query", "log"]
    factors, gq = explicit_factors(model, x, y), flat(model, xq, yq)
    xs, ys = make_data(n=4, seed=2)
    gs, gt = flat(model, xs, ys), flat(model, x, y)
    got = scores(run, model, xs, ys)
    compared = 0
    for m in MLP_MODULES:
        (a, s), (_, d_out, d_in) = factors[m], run.dims[m]
        root_a, root_s, m_out, m_in = reference_grams(a, s, gq[m].reshape(-1, d_out, d_in))
        ref = {"out": root_s @ top(m_out, 2), "in": root_a @ top(m_in, 2)}
        for side, p in ref.items():
            mine = run.projector.tensors[f"{m}/{side}"][0].double()
            assert mine.shape == p.shape
            torch.testing.assert_close(mine @ mine.T, p @ p.T, rtol=1e-4, atol=1e-6)
            compared += 1
        ps, pt = ((ref["out"].T @ g.reshape(-1, d_out, d_in) @ ref["in"]).flatten(1) for g in (gs[m], gt[m]))
        torch.testing.assert_close(got.per_module[m].double(), ps @ pt.T, rtol=1e-4, atol=1e-5)
    assert compared == 4 and got.scores.shape == (4, 40)


@pytest.mark.parametrize("rank, exact", [(3, True), (2, False)])
def test_scores_of_the_query_sample_are_the_kfac_products(tmp_path, data, rank, exact):
    """An MLP's per-example gradient is rank one, δ [a, 1]ᵀ: with r ≥ number of queries every query lies in
    span(P_out) ⊗ span(P_in), so the dot products of stored gradients are vec(Q)ᵀ(S_λ ⊗ A_λ)⁻¹vec(G)
    exactly; with r below it they are not."""
    x, y, xq, yq = data
    xq, yq = xq[:3], yq[:3]
    model = make_mlp(h=8).eval()  # (8, 7) and (3, 9): rank 3 compresses all but the 3-wide output side
    run, _ = query_run(tmp_path, model, x, y, xq, yq, rank=rank)
    assert run.projector.tensors["0/in"].shape == (1, 7, rank)
    got = scores(run, model, xq, yq)
    ref = reference_scores(explicit_factors(model, x, y), flat(model, xq, yq), flat(model, x, y))
    gaps = []
    for m in MLP_MODULES:
        gaps.append(float((got.per_module[m].double() - ref[m]).abs().max() / ref[m].abs().max()))
        if exact:
            torch.testing.assert_close(got.per_module[m].double(), ref[m], rtol=1e-4, atol=1e-5)
    assert len(gaps) == 2 and got.scores.shape == (3, 40)
    if not exact:
        assert max(gaps) > 1e-2  # a query direction fell outside the kept subspace


def test_scheduler_phases_and_reopened_projections(tmp_path, data):
    x, y, xq, yq = data
    model = make_mlp(h=5).eval()
    fresh = AnaLog("fresh", {"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 2, "init": "query"}})
    assert len(AnaLogScheduler(fresh.watch(model))) == 3
    run, phases = query_run(tmp_path, model, x, y, xq, yq, rank=2, hessian="kfac")
    assert phases == ["pca", "query", "log"]
    before = scores(run, model, xq, yq).scores
    again = AnaLog("q", {"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 2, "init": "query"},
                         "hessian": "kfac", "progress": False}).watch(model)
    assert again.phase == "log" and len(AnaLogScheduler(again)) == 1
    assert sorted(again.projector.tensors) == sorted(run.projector.tensors) == ["0/in", "0/out", "2/in", "2/out"]
    for key, p in run.projector.tensors.items():
        assert torch.equal(again.projector.tensors[key], p)
    assert len(again.open_store()) == 40  # the store's projection fingerprint matches the reloaded one
    torch.testing.assert_close(scores(again, model, xq, yq).scores, before)


def _after_statistics_pass(tmp_path, model, x, y, **compression):
    run = AnaLog("e", {"root_dir": str(tmp_path), "progress": False,
                       "compression": {"type": "logra", "rank": 2, "init": "query", **compression}})
    run.watch(model)
    with run(data_id=list(range(len(x)))):
        loss_fn(model(x), y).backward()
    model.zero_grad()
    run.next_pass()
    assert run.phase == "query"
    return run


def test_query_pass_errors(tmp_path, data):
    x, y, xq, yq = data
    model = make_mlp(h=5).eval()
    run = _after_statistics_pass(tmp_path / "a", model, x, y)
    with pytest.raises(RuntimeError, match="query pass and nothing was logged"):
        run.finalize()
    with pytest.raises(RuntimeError, match="query pass saw no queries"):
        run.next_pass()
    run = _after_statistics_pass(tmp_path / "b", model, x, y)
    with pytest.warns(UserWarning, match=r"\['2'\] were not called"), run():
        model[0](xq).sum().backward()  # module "2" is never reached by this query loss
    model.zero_grad()
    with pytest.raises(ValueError, match=r"query pass has no gradients for module\(s\) \['2'\]"):
        run.next_pass()
    with pytest.raises(ValueError, match="allocate"):
        AnaLog("s", {"compression": {"type": "logra", "init": "query", "allocate": "spectrum"}})


def test_too_few_query_directions_warn_naming_the_sides(tmp_path, data):
    """One query: each side's Gram has rank one, below the rank 2 of every side of module 0 (its other
    eigenvalues are float32 rounding, ~1e-8 of the largest); two queries: no warning."""
    x, y, xq, yq = data
    model = make_mlp(h=5).eval()
    run = _after_statistics_pass(tmp_path, model, x, y, rank={"0": 2, "2": [3, 6]})  # module 2 kept whole
    with run():
        loss_fn(model(xq[:1]), yq[:1]).backward()
    model.zero_grad()
    with pytest.warns(UserWarning, match=r"fewer directions than the rank in \['0/out', '0/in'\]") as caught:
        run.next_pass()
    assert len(caught) == 1 and run.phase == "log"
    run = _after_statistics_pass(tmp_path / "two", model, x, y, rank={"0": 2, "2": [3, 6]})
    with run():
        loss_fn(model(xq[:2]), yq[:2]).backward()  # two queries span two directions per side: no warning
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.next_pass()
    assert run.phase == "log"


def assert_rank2_projections_equal_reference(run, model, x, y, xq, yq):
    """P Pᵀ of every module and side of a rank-2 query fit equal R · top-2 eigenvectors of the explicit whitened
    query Grams (training data x, y; query sample xq, yq)."""
    factors, gq = explicit_factors(model, x, y), flat(model, xq, yq)
    compared = 0
    for m in MLP_MODULES:
        (a, s), (_, d_out, d_in) = factors[m], run.dims[m]
        root_a, root_s, m_out, m_in = reference_grams(a, s, gq[m].reshape(-1, d_out, d_in))
        for side, p in (("out", root_s @ top(m_out, 2)), ("in", root_a @ top(m_in, 2))):
            mine = run.projector.tensors[f"{m}/{side}"][0].double()
            torch.testing.assert_close(mine @ mine.T, p @ p.T, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == 4


def test_blocks_that_raise_add_nothing_to_either_pass(tmp_path, data):
    """A block interrupted after its backward (an error in the loop body, a KeyboardInterrupt) adds nothing:
    the fitted projections equal the explicit reference of the blocks that completed. Before, the statistics
    pass kept the interrupted block's factor sums without its examples, and the query pass carried its calls
    into the next block (as more positions of other queries; a different batch size made it crash)."""
    x, y, xq, yq = data
    model = make_mlp(h=5).eval()
    run = AnaLog("i", {"root_dir": str(tmp_path), "progress": False,
                       "compression": {"type": "logra", "rank": 2, "init": "query"}})
    run.watch(model)
    noise = make_data(n=3, seed=5)
    interrupted = 0
    for phase, (xi, yi) in (("pca", noise), ("query", (xq[:2], yq[:2]))):
        with pytest.raises(KeyboardInterrupt):
            with run(data_id=["a", "b", "c"][: len(xi)]):
                loss_fn(model(xi), yi).backward()
                raise KeyboardInterrupt
        interrupted += 1
        model.zero_grad()
        xs, ys = (x, y) if phase == "pca" else (xq, yq)  # then every block of the pass completes
        with run(data_id=list(range(len(xs)))):
            loss_fn(model(xs), ys).backward()
        model.zero_grad()
        run.next_pass()
    assert interrupted == 2 and run.phase == "log"
    assert_rank2_projections_equal_reference(run, model, x, y, xq, yq)


def test_passes_without_ids_and_nonfinite_blocks(tmp_path, data):
    """Blocks without data_id count their batch in the statistics pass too (it counted 0, then claimed it
    "saw no data"); a block with NaN gradients in either pass is a FloatingPointError naming the modules
    (it was an unexplained eigh failure at next_pass) and adds nothing: the projections equal the reference."""
    x, y, xq, yq = data
    model = make_mlp(h=5).eval()
    run = AnaLog("n", {"root_dir": str(tmp_path), "progress": False,
                       "compression": {"type": "logra", "rank": 2, "init": "query"}})
    run.watch(model)
    errors = 0
    for phase, (xs, ys) in (("pca", (x, y)), ("query", (xq, yq))):
        with pytest.raises(FloatingPointError, match=r"non-finite .*in module\(s\) \['0', '2'\]"):
            with run():
                (loss_fn(model(xs[:3]), ys[:3]) * float("nan")).backward()
        errors += 1
        model.zero_grad()
        for i in range(0, len(xs), 20):
            with run():
                loss_fn(model(xs[i : i + 20]), ys[i : i + 20]).backward()
            model.zero_grad()
        if phase == "pca":
            assert run._pass_stats.n_samples == len(x) == 40
        run.next_pass()
    assert errors == 2 and run.phase == "log"
    assert_rank2_projections_equal_reference(run, model, x, y, xq, yq)


class TinySequenceModel(nn.Module):
    """Embedding → tanh(mid) → tanh(mid) → out over (B, T, D): ``mid`` is called twice per forward."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid, self.out = nn.Linear(width, width), nn.Linear(width, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(self.emb(x))))))


def next_token_loss(model, x):
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")


def hooked_calls(model, x):
    """{"mid"|"out": [(input with a ones column for the bias (B, T, d_in + 1), output gradient (B, T, d_out))
    of each call]} of the summed next-token loss on ``x``, by plain forward hooks (no analog code)."""
    seen = {"mid": [], "out": []}

    def hook(name):
        def keep(module, inputs, output):
            entry = [torch.cat([inputs[0].detach(), torch.ones(*inputs[0].shape[:-1], 1)], -1), None]
            output.register_hook(lambda g: entry.__setitem__(1, g))
            seen[name].append(entry)
        return keep

    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in seen]
    next_token_loss(model, x).backward()
    model.zero_grad()
    for h in handles:
        h.remove()
    return seen


def sequence_factors(model, x):
    """{module: (A, S)}: A = mean over positions (of every call) of [a, 1][a, 1]ᵀ, S = (1/N) Σ_calls,t δ_t δ_tᵀ,
    from forward-hook inputs and the output gradients of the summed loss (per example: examples are independent)."""
    out = {}
    for name, calls in hooked_calls(model, x).items():
        a = torch.cat([i.flatten(0, 1) for i, _ in calls]).double()
        d = torch.cat([g.flatten(0, 1) for _, g in calls]).double()
        assert len(calls) == (2 if name == "mid" else 1)
        out[name] = (a.T @ a / len(a), d.T @ d / len(x))
    return out


def test_sequence_grams_equal_explicit_per_example_grams(tmp_path):
    """T × T kernels per example (two calls of ``mid`` = more positions of one example) give the Grams of the
    explicit per-sequence gradients Q_b = Σ_t δ_t a_tᵀ (torch.func over the sequence)."""
    torch.manual_seed(0)
    model = TinySequenceModel().eval()
    gen = torch.Generator().manual_seed(0)
    x, xq = torch.randint(0, 7, (12, 5), generator=gen), torch.randint(0, 7, (3, 5), generator=gen)
    run = AnaLog("t", {"root_dir": str(tmp_path), "progress": False,
                       "compression": {"type": "logra", "rank": 2, "init": "query"}})
    run.watch(model, type_filter=[nn.Linear])
    with run(data_id=list(range(12))):
        next_token_loss(model, x).backward()
    model.zero_grad()
    run.next_pass()
    assert isinstance(run._pass_stats, QueryGrams)
    with run():
        next_token_loss(model, xq).backward()
    model.zero_grad()
    grams, n = run._pass_stats.reduced()[1], run._pass_stats.n_samples
    assert n == 3
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_example = vmap(grad(lambda p, s: next_token_loss(lambda z: functional_call(model, p, (z,)), s[None])),
                       in_dims=(None, 0))(params, xq)
    factors, compared = sequence_factors(model, x), 0
    for name in ("mid", "out"):
        q = torch.cat([per_example[f"{name}.weight"], per_example[f"{name}.bias"][..., None]], -1)  # (3, d_out, d_in)
        _, _, m_out, m_in = reference_grams(*factors[name], q)
        for side, ref in (("out", m_out), ("in", m_in)):
            assert grams[name][side].shape == (1, *ref.shape)
            torch.testing.assert_close(grams[name][side][0], ref, rtol=1e-4, atol=1e-7)
            compared += 1
    assert compared == 4


@pytest.mark.parametrize("t", [3, 40])  # 3² < d_out·d_in: T × T kernels; 40² > 4·6: the per-query gradients
def test_query_grams_equal_the_formula_on_both_paths(t):
    """QueryGrams on random (a, δ) of two calls per block equals Σ_b Q̃_b Q̃_bᵀ, Σ_b Q̃_bᵀ Q̃_b with
    Q̃_b = R_S (Σ_calls Σ_t δ_t a_tᵀ) R_A formed explicitly, whichever path it takes (T × T kernels or
    the per-query gradients)."""
    gen = torch.Generator().manual_seed(t)
    b, g, d_out, d_in = 3, 2, 4, 6
    def spd(d):
        m = torch.randn(g, d, d, generator=gen, dtype=torch.float64)
        return m @ m.transpose(-1, -2) + torch.eye(d, dtype=torch.float64)
    root_a, root_s = spd(d_in), spd(d_out)
    grams = QueryGrams({"m": (root_a, root_s)})
    calls = [(torch.randn(b, t, g, d_in, generator=gen), torch.randn(b, t, g, d_out, generator=gen)) for _ in range(2)]
    for a, d in calls:
        grams.observe("m", a, d, None)
    grams.add_block()
    q = sum(torch.einsum("btgo,btgi->bgoi", d.double(), a.double()) for a, d in calls)
    q = torch.einsum("gpo,bgoi,gij->bgpj", root_s.transpose(-1, -2), q, root_a)  # R_S Q R_A (R symmetric)
    expected = {"out": torch.einsum("bgoi,bgpi->gop", q, q), "in": torch.einsum("bgoi,bgoj->gij", q, q)}
    n, got = grams.reduced()
    assert n == b
    compared = 0
    for side in ("out", "in"):
        torch.testing.assert_close(got["m"][side], expected[side], rtol=1e-4, atol=1e-3)
        compared += 1
    assert compared == 2


def test_masked_positions_are_left_out_of_the_query_grams(tmp_path):
    """With ``analog(mask=...)`` in the query pass, a query's whitened gradient is Σ_t m_t δ_t a_tᵀ over its
    real positions (analog.capture.masks): the Grams equal that explicit sum over hooked (a, δ), and differ
    from the unmasked ones."""
    torch.manual_seed(1)
    model = TinySequenceModel().eval()
    gen = torch.Generator().manual_seed(1)
    x, xq = torch.randint(0, 7, (12, 5), generator=gen), torch.randint(0, 7, (3, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    run = AnaLog("m", {"root_dir": str(tmp_path), "progress": False,
                       "compression": {"type": "logra", "rank": 2, "init": "query"}})
    run.watch(model, type_filter=[nn.Linear])
    with run(data_id=list(range(12))):
        next_token_loss(model, x).backward()
    model.zero_grad()
    run.next_pass()
    with run(mask=mask):
        next_token_loss(model, xq).backward()
    model.zero_grad()
    grams = run._pass_stats.reduced()[1]

    seen = hooked_calls(model, xq)
    factors, compared = sequence_factors(model, x), 0
    for name, calls in seen.items():
        masked = sum(torch.einsum("bt,bto,bti->boi", mask.double(), d.double(), a.double()) for a, d in calls)
        full = sum(torch.einsum("bto,bti->boi", d.double(), a.double()) for a, d in calls)
        _, _, m_out, m_in = reference_grams(*factors[name], masked)
        _, _, u_out, _ = reference_grams(*factors[name], full)
        assert not torch.allclose(m_out, u_out, rtol=1e-2)  # the mask matters for this query batch
        for side, ref in (("out", m_out), ("in", m_in)):
            torch.testing.assert_close(grams[name][side][0], ref, rtol=1e-4, atol=1e-7)
            compared += 1
    assert compared == 4
