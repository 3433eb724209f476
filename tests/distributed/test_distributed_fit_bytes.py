"""Ranks given different ``fit_bytes`` fit the same raw curvature, that of the stored rows (a real gloo group).

The reference is built from the store's rows alone: F̂ = (1/N) Σ_n g_n g_nᵀ per module, compared with
Q diag(e) Qᵀ of each rank's fit."""

import torch
from distributed_helpers import N, errors, run_group
from fit_bytes_helpers import worker_uneven_fit_bytes

from analog.storage import LogStore


def test_ranks_with_different_fit_bytes_fit_the_stored_rows(tmp_path):
    root = tmp_path / "logs"
    codes = run_group(worker_uneven_fit_bytes, tmp_path, root=str(root), timeout=60.0, pg_timeout=10.0)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    results = [torch.load(tmp_path / f"result_rank{r}.pt", weights_only=False) for r in range(2)]

    store = LogStore(root / "uneven" / "logs")
    _, logs = store.batch(0, len(store))
    assert len(store) == N and sorted(logs) == ["0", "2"]
    compared = 0
    for result in results:
        assert result["n"] == N
        for m in ("0", "2"):
            g = logs[m]["grad"].reshape(N, -1).double()
            expected = g.T @ g / N
            q, e = result["state"][f"{m}/evecs"].double(), result["state"][f"{m}/evals"]
            assert expected.shape == (9, 9)
            torch.testing.assert_close(q @ torch.diag(e) @ q.T, expected, rtol=1e-5, atol=1e-7)
            compared += 1
    assert compared == 4
