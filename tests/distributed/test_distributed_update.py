"""update() on one rank only, or with different values per rank: one RankError on every rank, at once (real gloo).

Before, a segments.checkpoint set on one rank made the ranks' finalize() run different collectives, which
waited until the group's timeout; other settings were never compared (hessian only at the first block, as a
garbled mismatch of two different checks; damping not at all: distributed scores mixed two dampings).
"""

import pytest
import torch
from distributed_helpers import errors, run_group
from update_helpers import SCENARIOS, worker_update

PG_TIMEOUT = 15.0
CHECK = "the check of the log pass (at its first `with analog(...)` block, or its end if none)"
EXPECTED = {
    "checkpoint_one_rank": (f"RankError: ranks disagree at {CHECK} on settings that must agree: segments.checkpoint: "
                            "rank 0: False, rank 1: True (set by update() on rank 1)"),
    "hessian_after_watch": (f"RankError: ranks are at different collective steps (rank 0: {CHECK}, rank 1: update()): "
                            "every rank must make analog's collective calls (watch, update of a fixed setting after "
                            "watch, next_pass, new_segment, finalize/eval, refit, distributed scoring) alike and in "
                            "the same order; they also disagree on settings that must agree: hessian: rank 0: 'kfac', "
                            "rank 1: 'raw' (set by update() on rank 1)"),
    "nonfinite_both": (f"RankError: ranks disagree at {CHECK} on settings that must agree: nonfinite: rank 0: 'allow', "
                       "rank 1: 'error' (set by update() on ranks 0, 1)"),
    "per_rank": None,
    "damping_scoring": ("RankError: ranks disagree at scoring a share of the store on settings that must agree: "
                        "damping: rank 0: None, rank 1: 0.5 (set by update() on rank 1)"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("update")
    codes = run_group(worker_update, tmp, root=str(tmp / "logs"), timeout=60.0, pg_timeout=PG_TIMEOUT)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp)}"
    return [torch.load(tmp / f"result_rank{r}.pt", weights_only=False) for r in range(2)]


def test_every_rank_raises_the_same_error_naming_the_setting_and_who_set_it(results):
    assert sorted(EXPECTED) == sorted([*SCENARIOS, "damping_scoring"])
    compared = 0
    for key, expected in EXPECTED.items():
        for rank in range(2):
            assert results[rank][key] == expected, (key, rank, results[rank][key])
            assert results[rank][f"{key}_seconds"] < PG_TIMEOUT / 2, (key, rank, results[rank][f"{key}_seconds"])
            compared += 1
    assert compared == 2 * len(EXPECTED)


def test_damping_alike_again_scores_as_one_rank_does_alone(results):
    """After the refusal, the same collective call with damping alike succeeds and equals rank 1 scoring the
    whole store alone with that damping (rank 0's own scores, with another damping, differ)."""
    def by_id(scores, ids):
        return scores[:, sorted(range(len(ids)), key=lambda j: ids[j])]

    alone1 = by_id(*results[1]["damping_scores"][:2])
    alone0 = by_id(*results[0]["damping_scores"][:2])
    assert alone1.shape == (5, 32) and not torch.allclose(alone0, alone1, atol=1e-3, rtol=1e-3)
    for rank in range(2):
        torch.testing.assert_close(by_id(*results[rank]["damping_scores"][2:]), alone1, atol=1e-5, rtol=1e-4)
