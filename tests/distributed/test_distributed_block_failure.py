"""A `with analog(...)` block failing on one rank only is one RankError on every rank, at once (real gloo group).

Rank 1's block raises and the error propagates through its ``finally: run.finalize()``; rank 0 reaches its
next collective step. Before, rank 0 finished finalize() alone with rank 1's later batches missing (no
error at all on rank 0), or waited in new_segment() until the group's timeout. Collectives time out after
PG_TIMEOUT seconds: every rank must raise well before. The store keeps every batch logged before the
failure and no curvature; a new group resumes it and its curvature equals one process over all examples.
"""

import pytest
import torch
from block_failure_helpers import SCENARIOS, single_process, worker_block_fails, worker_ddp_exit, worker_resume
from distributed_helpers import N, errors, run_group, shard

from analog.hessian import Curvature
from analog.state import read_curvature
from analog.storage import LogStore

PG_TIMEOUT = 15.0
TOL = dict(atol=1e-5, rtol=1e-4)
FAILED_IDS = {"forward": [9, 11, 13, 15], "nonfinite": [9, 11, 13, 15], "repeated_id": [1, 3, 5, 7]}
STOPPED = ("; open a new AnaLog on the project to resume (is_logged() tells which batches its store holds)")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("block_failure")
    codes = run_group(worker_block_fails, tmp, root=str(tmp / "logs"), timeout=60.0, pg_timeout=PG_TIMEOUT)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp)}"
    return tmp, [torch.load(tmp / f"result_rank{r}.pt", weights_only=False) for r in range(2)]


def _expected(how, error):
    block = f"`with analog(data_id={FAILED_IDS[how]})` block"
    at = SCENARIOS[how]
    head = "finalize()" if at == "finalize()" else "a collective step"
    tail = "" if at == "finalize()" else " (ranks at different steps: rank 0: new_segment(), rank 1: finalize())"
    return (f"RankError: {head} failed on rank 1 ({error} in its {block}; it called finalize() while that "
            f"propagated){tail}")


def test_every_rank_raises_the_same_error_naming_rank_1_and_its_block(group):
    _, results = group
    errors_of_rank1 = {
        "forward": "ValueError: injected: the forward failed on rank 1",
        "nonfinite": ("FloatingPointError: non-finite grad log in module '0' for ids [9, 11, 13, 15]; nothing of "
                      "this batch was stored (set nonfinite='allow' to store it anyway)"),
        "repeated_id": ("ValueError: id 1 was already logged in segment 0; ids are unique within a segment: call "
                        "analog.new_segment() first (e.g. at each epoch), or use segments rule 'repeat' (nothing of "
                        "this batch was stored)"),
    }
    compared = 0
    for how in SCENARIOS:
        expected = _expected(how, errors_of_rank1[how])
        # rank 1: the RankError of its finalize(), raised while its own error propagated
        assert results[1][how]["chain"] == [expected, errors_of_rank1[how]], results[1][how]["chain"]
        chain0 = results[0][how]["chain"]
        if SCENARIOS[how] == "finalize()":
            assert chain0 == [expected], chain0
        else:  # rank 0 raised at new_segment(); its `finally: finalize()` raises at once, with no collective
            stopped = f"RankError: this AnaLog stopped on every rank when a collective step raised: {expected[11:]}"
            assert chain0 == [stopped + STOPPED, expected], chain0
        for rank in range(2):
            assert results[rank][how]["seconds"] < PG_TIMEOUT / 2, (how, rank, results[rank][how]["seconds"])
            assert results[rank][how]["again"].startswith("RankError: this AnaLog stopped on every rank")
            assert results[rank][how]["again_seconds"] < 1.0
            compared += 1
    assert compared == 2 * len(SCENARIOS)


def test_the_store_keeps_what_was_logged_and_no_curvature(group):
    tmp, _ = group
    logged_by_rank0 = {"finalize()": [i for ids in shard(0, 2) for i in ids],  # its whole shard
                       "new_segment()": [i for ids in shard(0, 2)[:2] for i in ids]}  # up to the boundary
    for how in SCENARIOS:
        store = LogStore(tmp / "logs" / how / "logs")
        assert sorted(store.ids) == sorted(logged_by_rank0[SCENARIOS[how]] + shard(1, 2)[0]), how
        assert read_curvature(tmp / "logs" / how / "state") is None, how


def test_a_new_group_resumes_the_store_and_fits_the_uninterrupted_curvature(group, tmp_path):
    tmp, _ = group
    codes = run_group(worker_resume, tmp_path, root=str(tmp / "logs"), project="forward", timeout=60.0,
                      pg_timeout=PG_TIMEOUT)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    resumed = [torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=False) for r in range(2)]
    assert resumed[0]["skipped"] == shard(0, 2) and resumed[1]["skipped"] == shard(1, 2)[:1]
    assert [r["n_samples"] for r in resumed] == [N, N]
    assert sorted(LogStore(tmp / "logs" / "forward" / "logs").ids) == list(range(N))
    got = Curvature.load(tmp / "logs" / "forward" / "state")
    want = single_process(tmp_path / "single", "forward")
    assert sorted(got.state) == sorted(want.state)
    keys = [f"{m}/{k}" for m in ("0", "2") for k in ("A", "S", "eA", "eS")]  # the factors and their eigenvalues
    for key in keys:
        assert want.state[key].abs().max() > 0
        torch.testing.assert_close(got.state[key], want.state[key], **TOL)
    assert got.meta["n_samples"] == want.meta["n_samples"] == N and len(keys) == 8


def test_under_ddp_backward_the_failing_rank_exits_and_its_peer_fails_at_once(tmp_path):
    """The documented limit (README, Distributed): with DDP's backward inside the block, the peers of a failing
    rank wait in DDP's own all-reduce, which analog cannot reach; the recommended pattern is to let the error
    end the process (no analog call in a ``finally:``). Under gloo the peer then fails at once."""
    codes = run_group(worker_ddp_exit, tmp_path, root=str(tmp_path / "logs"), timeout=60.0, pg_timeout=PG_TIMEOUT)
    assert codes == [0, 1], f"exit codes {codes}\n{errors(tmp_path)}"
    assert "ValueError: injected: the forward failed on rank 1" in (tmp_path / "error_rank1.txt").read_text()
    result = torch.load(tmp_path / "result_rank0.pt", weights_only=False)
    # gloo says "Connection closed by peer" or "Connection reset by peer", as the peer's exit goes
    assert result["error"] is not None and "by peer" in result["error"], result["error"]
    assert result["seconds"] < PG_TIMEOUT / 2, result["seconds"]
