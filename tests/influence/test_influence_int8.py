"""Influence from an int8 store against the same run logged in float32 (LoGra, tiny MLP).

The int8 store holds x̂ = q · scale with |x − x̂| ≤ ε = scale/2 · (1 + 2⁻¹⁵) per element
(analog.storage.encoding); queries are not quantised. With p = (F̂ + λI)⁻¹ g_q per module:

* ``kfac``: F̂ comes from the capture's statistics, not from the rows, so p is the same in both
  runs and |s₈ − s₃₂| = |Σ_m p_mᵀ (x̂ − x)_m| ≤ Σ_m ‖p_m‖₁ ε_m.
* ``raw``: F̂ = XᵀX/N is fitted from the stored rows, so it moves too. With A = F̂ + λI,
  s₈ − s₃₂ = p̂ᵀ(x̂ − x) − xᵀÂ⁻¹ ΔF p, hence per module
  |·| ≤ ‖p̂‖₁ ε_t + (‖x_t‖₂ / λ) ‖ΔF‖₂ ‖p‖₂ with ‖ΔF‖₂ ≤ (1/N) Σ_n (2 ‖x_n‖₂ ‖e_n‖₂ + ‖e_n‖₂²)
  and ‖e_n‖₂ ≤ √D ε_n (D values per module).

Both bounds get a float32 rounding allowance of 1e-5 · Σ |p| |x|. p, p̂ and the raw scores are
formed explicitly here in float64 from the stores' rows (numpy), independently of analog's curvature.
"""

import numpy as np
import pytest
import torch
from conftest import make_data, make_mlp, query_log, run_logging

from analog import AnaLog
from analog.cli import main as cli
from analog.state import ProjectError

COMPRESSION = {"type": "logra", "rank": 4}
LAMBDA = 0.05
SLACK = 1 + 2.0**-15
ROUNDING = 1e-5
Q = 8  # self-queries: the first Q training examples


def quantise(x: np.ndarray):
    """(scale (n,), x̂ (n, D)) of one field by the formula, float32 numpy."""
    s = (np.abs(x).max(1) / np.float32(127)).astype(np.float32)
    div = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / div[:, None]), -127, 127).astype(np.int8)
    return s, q.astype(np.float32) * s[:, None]


def log_both(root, hessian):
    x, y = make_data()
    out = {}
    for dtype in ("float32", "int8"):
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


def check_rows_and_queries(r32, r8):
    """The int8 store holds exactly the formula applied to the float32 store's rows; queries are equal."""
    eps, compared = {}, 0
    for m, x in r32["rows"].items():
        s, xhat = quantise(x)
        np.testing.assert_array_equal(r8["rows"][m], xhat)
        assert np.all(np.abs(x - xhat) <= (s / 2 * SLACK)[:, None])
        eps[m] = s.astype(np.float64) / 2 * SLACK
        compared += x.size
        assert torch.equal(r8["queries"][m], r32["queries"][m]), "query gradients are not quantised"
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


def test_int8_influence_matches_float32_within_the_bound_kfac(tmp_path):
    runs = log_both(tmp_path, "kfac")
    r32, r8 = runs["float32"], runs["int8"]
    eps = check_rows_and_queries(r32, r8)
    for key, value in r32["run"].curvature.state.items():  # K-FAC comes from the capture: unchanged
        torch.testing.assert_close(r8["run"].curvature.state[key], value, rtol=1e-12, atol=0)
    pre = {m: p.double().numpy() for m, p in r8["run"].influence.precondition(r8["queries"]).items()}
    bound = sum(np.abs(pre[m]).sum(1)[:, None] * eps[m][None, :] for m in pre)
    bound = bound + ROUNDING * sum(np.abs(pre[m]) @ np.abs(r32["rows"][m]).T for m in pre)
    diff = np.abs(r8["scores"] - r32["scores"])
    assert diff.shape == (Q, 48) and (diff <= bound).all(), float((diff / bound).max())
    assert diff.max() > 0, "int8 scores differ from float32 ones (the rows were quantised)"
    assert_same_top1(r32["scores"], r8["scores"])
    check_reopen_and_verify(tmp_path, r8["run"])


def test_int8_influence_matches_float32_within_the_bound_raw(tmp_path):
    runs = log_both(tmp_path, "raw")
    r32, r8 = runs["float32"], runs["int8"]
    eps = check_rows_and_queries(r32, r8)
    ref32, p = raw_reference(r32["rows"], r32["queries"], 48)
    ref8, p_hat = raw_reference(r8["rows"], r8["queries"], 48)
    for got, ref in ((r32["scores"], ref32), (r8["scores"], ref8)):  # analog computes the explicit formula
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
    diff = np.abs(r8["scores"] - r32["scores"])
    assert diff.shape == (Q, 48) and (diff <= bound).all(), float((diff / bound).max())
    assert diff.max() > 0
    assert_same_top1(r32["scores"], r8["scores"])


def assert_same_top1(s32, s8):
    top32, top8 = s32.argmax(1), s8.argmax(1)
    assert len(top32) == Q and (top32 == top8).all(), (top32, top8)


def check_reopen_and_verify(root, run):
    with pytest.raises(ProjectError, match="storage.dtype: saved 'int8', given 'float32'"):
        AnaLog(project=run.project, config={"root_dir": str(root), "storage": {"dtype": "float32"}})
    assert cli(["store", "verify", str(run.path)]) == 0
    chunk = run.log_path / "chunk_000000.bin"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x10  # an int8 value of the chunk's last row
    chunk.write_bytes(bytes(data))
    assert cli(["store", "verify", str(run.path)]) == 1
