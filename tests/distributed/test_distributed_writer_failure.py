"""A log writer failing on one rank at finalize() is an error on every rank, at once (real gloo group)."""

import torch
from distributed_helpers import errors, run_group
from writer_failure_helpers import worker_writer_fails

PG_TIMEOUT = 15.0


def test_a_writer_failing_on_one_rank_at_finalize_raises_on_every_rank(tmp_path):
    codes = run_group(worker_writer_fails, tmp_path, root=str(tmp_path / "logs"), timeout=60.0,
                      pg_timeout=PG_TIMEOUT)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    results = [torch.load(tmp_path / f"result_rank{r}.pt", weights_only=False) for r in range(2)]
    expected = ("RankError: finalize() failed on rank 1 "
                "(closing the log writer: OSError: injected: no space left for the last chunk)")
    assert [r["error"] for r in results] == [expected, expected]
    assert all(r["seconds"] < PG_TIMEOUT / 2 for r in results), [r["seconds"] for r in results]
