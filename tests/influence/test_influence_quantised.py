"""Influence from an int8, int4 or int2 store against the same run logged in float32 (LoGra, tiny MLP).

The store holds x̂ = q · scale with scale = max|x|/L (L = 127 for int8, 7 for int4) and
|x − x̂| ≤ ε = scale/2 · (1 + 4L·2⁻²⁴) per element (analog.storage.encoding: ≤ 1 + 2⁻¹⁵ for int8,
≤ 1 + 2⁻¹⁹ for int4); queries are not quantised. With p = (F̂ + λI)⁻¹ g_q per module:

* ``kfac``: F̂ comes from the capture's statistics, not from the rows, so p is the same in both
  runs and |s_q − s₃₂| = |Σ_m p_mᵀ (x̂ − x)_m| ≤ Σ_m ‖p_m‖₁ ε_m.
* ``raw``: F̂ = XᵀX/N is fitted from the stored rows, so it moves too. With A = F̂ + λI,
  s_q − s₃₂ = p̂ᵀ(x̂ − x) − xᵀÂ⁻¹ ΔF p, hence per module
  |·| ≤ ‖p̂‖₁ ε_t + (‖x_t‖₂ / λ) ‖ΔF‖₂ ‖p‖₂ with ‖ΔF‖₂ ≤ (1/N) Σ_n (2 ‖x_n‖₂ ‖e_n‖₂ + ‖e_n‖₂²)
  and ‖e_n‖₂ ≤ √D ε_n (D values per module).

Both bounds get a float32 rounding allowance of 1e-5 · Σ |p| |x|. p, p̂ and the raw scores are
formed explicitly here in float64 from the stores' rows (numpy), independently of analog's curvature.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp, query_log, run_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))
from gauss2_reference import gauss2_decoded, gauss2_reference  # noqa: E402

from analog import AnaLog
from analog.cli import main as cli
from analog.state import ProjectError

COMPRESSION = {"type": "logra", "rank": 4}
LAMBDA = 0.05
#: per store dtype: (levels L, the float32 allowance 1 + 2^k ≥ 1 + 4L·2⁻²⁴ on scale/2)
QUANTISED = {"int8": (127, 1 + 2.0**-15), "int4": (7, 1 + 2.0**-19)}
ROUNDING = 1e-5
Q = 8  # self-queries: the first Q training examples


def quantise(x: np.ndarray, levels: int):
    """(scale (n,), x̂ (n, D)) of one field by the formula, float32 numpy."""
    s = (np.abs(x).max(1) / np.float32(levels)).astype(np.float32)
    div = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / div[:, None]), -levels, levels).astype(np.int8)
    return s, q.astype(np.float32) * s[:, None]


def log_both(root, hessian, quantised):
    x, y = make_data()
    out = {}
    for dtype in ("float32", quantised):
        model = make_mlp()
        run = run_logging(model, x, y, root, f"{hessian}-{dtype}", hessian, COMPRESSION, damping=LAMBDA,
                          storage={"dtype": dtype})
        _, q_logs = query_log(run, model, x[:Q], y[:Q])
        store = run.open_store()
        ids, logs = store.batch(0, len(store))
        assert ids == list(range(len(x)))
        rows = {m: logs[m]["grad"].reshape(len(ids), -1).numpy() for m in logs}
        queries = {m: q_logs[m]["grad"] for m in q_logs}
        scores = run.influence.compute_influence_all((list(range(Q)), q_logs)).scores.double().numpy()
        out[dtype] = {"run": run, "rows": rows, "queries": queries, "scores": scores, "n": len(x)}
    return out


def check_rows_and_queries(r32, rq, dtype):
    """The quantised store holds exactly the formula applied to the float32 store's rows; queries are equal."""
    (levels, slack), eps, compared = QUANTISED[dtype], {}, 0
    for m, x in r32["rows"].items():
        s, xhat = quantise(x, levels)
        np.testing.assert_array_equal(rq["rows"][m], xhat)
        assert np.all(np.abs(x - xhat) <= (s / 2 * slack)[:, None])
        eps[m] = s.astype(np.float64) / 2 * slack
        compared += x.size
        assert torch.equal(rq["queries"][m], r32["queries"][m]), "query gradients are not quantised"
    assert len(eps) == 2 and compared == 48 * (16 + 12)  # LoGra 4×4 and 3×4 (the 3 outputs cap r_out)
    return eps


def raw_reference(rows, queries, n):
    """(scores (Q, N), p per module) of the raw curvature formed explicitly in float64."""
    scores, pre = 0.0, {}
    for m, x in rows.items():
        x = x.astype(np.float64)
        a = x.T @ x / n + LAMBDA * np.eye(x.shape[1])
        pre[m] = np.linalg.solve(a, queries[m].reshape(Q, -1).double().numpy().T).T
        scores = scores + pre[m] @ x.T
    return scores, pre


@pytest.mark.parametrize("dtype", list(QUANTISED))
def test_quantised_influence_matches_float32_within_the_bound_kfac(tmp_path, dtype):
    runs = log_both(tmp_path, "kfac", dtype)
    r32, rq = runs["float32"], runs[dtype]
    eps = check_rows_and_queries(r32, rq, dtype)
    for key, value in r32["run"].curvature.state.items():  # K-FAC comes from the capture: unchanged
        torch.testing.assert_close(rq["run"].curvature.state[key], value, rtol=1e-12, atol=0)
    pre = {m: p.double().numpy() for m, p in rq["run"].influence.precondition(rq["queries"]).items()}
    bound = sum(np.abs(pre[m]).sum(1)[:, None] * eps[m][None, :] for m in pre)
    bound = bound + ROUNDING * sum(np.abs(pre[m]) @ np.abs(r32["rows"][m]).T for m in pre)
    diff = np.abs(rq["scores"] - r32["scores"])
    assert diff.shape == (Q, 48) and (diff <= bound).all(), float((diff / bound).max())
    assert diff.max() > 0, "quantised scores differ from float32 ones (the rows were quantised)"
    assert_same_top1(r32["scores"], rq["scores"], dtype, compared=Q)
    check_reopen_and_verify(tmp_path, rq["run"], dtype)


@pytest.mark.parametrize("dtype", list(QUANTISED))
def test_quantised_influence_matches_float32_within_the_bound_raw(tmp_path, dtype):
    runs = log_both(tmp_path, "raw", dtype)
    r32, rq = runs["float32"], runs[dtype]
    eps = check_rows_and_queries(r32, rq, dtype)
    ref32, p = raw_reference(r32["rows"], r32["queries"], 48)
    refq, p_hat = raw_reference(rq["rows"], rq["queries"], 48)
    for got, ref in ((r32["scores"], ref32), (rq["scores"], refq)):  # analog computes the explicit formula
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    bound = 0.0
    for m, x in r32["rows"].items():
        x = x.astype(np.float64)
        d = x.shape[1]
        norms, e_norms = np.linalg.norm(x, axis=1), np.sqrt(d) * eps[m]
        df = np.mean(2 * norms * e_norms + e_norms**2)  # ≥ ‖ΔF‖₂
        bound = bound + np.abs(p_hat[m]).sum(1)[:, None] * eps[m][None, :]
        bound = bound + np.linalg.norm(p[m], axis=1)[:, None] * df * norms[None, :] / LAMBDA
        bound = bound + ROUNDING * np.abs(p[m]) @ np.abs(x).T
    diff = np.abs(rq["scores"] - r32["scores"])
    assert diff.shape == (Q, 48) and (diff <= bound).all(), float((diff / bound).max())
    assert diff.max() > 0
    assert_same_top1(r32["scores"], rq["scores"], dtype, compared=Q if dtype == "int8" else Q - 1)


#: top-1 must agree on every self-query whose float32 top-two margin exceeds this share of its largest
#: |score|: all of them for int8; int4 (scores ~5% off here) may swap a near tie. At this seed the
#: raw run's query 6 is one (margin 0.8%: float32 ranks example 3 first, int4 example 6)
NEAR_TIE = {"int8": 0.0, "int4": 0.02}


def assert_same_top1(s32, sq, dtype, compared):
    top32, topq = s32.argmax(1), sq.argmax(1)
    ordered = np.sort(s32, 1)
    clear = ordered[:, -1] - ordered[:, -2] > NEAR_TIE[dtype] * np.abs(s32).max(1)
    assert len(top32) == Q and int(clear.sum()) == compared, clear
    assert (top32[clear] == topq[clear]).all(), (top32, topq)


def check_reopen_and_verify(root, run, dtype):
    other = "int4" if dtype == "int8" else "int8"
    with pytest.raises(ProjectError, match=f"storage.dtype: saved '{dtype}', given '{other}'"):
        AnaLog(project=run.project, config={"root_dir": str(root), "storage": {"dtype": other}})
    assert cli(["store", "verify", str(run.path)]) == 0
    chunk = run.log_path / "chunk_000000.bin"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x10  # a value of the chunk's last row (int4: the high nibble of its last byte)
    chunk.write_bytes(bytes(data))
    assert cli(["store", "verify", str(run.path)]) == 1


def test_int2_influence_is_the_raw_formula_on_the_formula_s_rows(tmp_path):
    """An int2 store holds int2's formula (rotation R, RMS σ, 2-bit codes, Rᵀ back; R formed densely by
    tests/storage/gauss2_reference) applied to the float32 run's rows (the same capture), and the
    ``raw`` scores from it are (F̂ + λI)⁻¹ formed explicitly in float64 from those rows; against float32 the
    top-1 training example of each self-query agrees where float32's top two are 5 % apart."""
    runs = log_both(tmp_path, "raw", "int2")
    r32, r2 = runs["float32"], runs["int2"]
    compared = 0
    for m, x in r32["rows"].items():
        sigma, codes, near = gauss2_reference(x, [x.shape[1]])
        clear = ~near.any(1)  # rows none of whose rotated values sits on a threshold
        xhat = gauss2_decoded(codes, sigma.astype(np.float32), [x.shape[1]])
        got = r2["rows"][m]
        assert (np.abs(got[clear] - xhat[clear]) <= 1e-5 * sigma[clear]).all()
        compared += int(clear.sum()) * x.shape[1]
        assert torch.equal(r2["queries"][m], r32["queries"][m]), "query gradients are not quantised"
    assert compared >= (48 - 2) * (16 + 12)
    ref, _ = raw_reference(r2["rows"], r2["queries"], 48)
    np.testing.assert_allclose(r2["scores"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert np.abs(r2["scores"] - r32["scores"]).max() > 0
    top32, top2 = r32["scores"].argmax(1), r2["scores"].argmax(1)
    ordered = np.sort(r32["scores"], 1)
    clear = ordered[:, -1] - ordered[:, -2] > 0.05 * np.abs(r32["scores"]).max(1)
    assert clear.sum() >= Q - 2 and (top32[clear] == top2[clear]).all(), (top32, top2, clear)
