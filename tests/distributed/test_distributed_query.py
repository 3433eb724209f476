"""LoGra ``init="query"`` on a real 2-process gloo group against one process that saw everything.

The query pass's whitened Gram sums are all-reduced over ranks (analog.compression.query), so ranks
that each saw half of the training data and half of the query sample must fit the projections of a
single process that saw all of both: compared as P Pᵀ per module and side (eigenvectors' signs and the
float reduction order may differ; the span may not), and through the ``raw`` influence scores of the
scoring queries by training id (invariant to those signs). Every rank must hold bitwise the same
projections. A rank without queries adds zero Grams; a query pass with no queries on any rank raises
the same RuntimeError on every rank — neither may hang (collectives time out after 20 s here).
"""

import pytest
import torch
from distributed_helpers import N_QUERY, N, errors, run_group
from query_helpers import QUERY_SPLITS, single_process, worker_query

TOL = dict(atol=1e-5, rtol=1e-4)
SIDES = ["0/in", "0/out", "2/in", "2/out"]


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query_ddp")
    codes = run_group(worker_query, tmp, root=str(tmp / "logs"), splits=list(QUERY_SPLITS), timeout=120)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp)}"
    return [torch.load(tmp / f"query_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_process(tmp_path_factory.mktemp("query_single"))


def _by_id(scores):
    order = sorted(range(len(scores.train_ids)), key=lambda j: scores.train_ids[j])
    return scores.scores[:, order]


@pytest.mark.parametrize("split", ["halves", "rank0_all", "rank1_all"])
def test_projections_equal_the_single_process_fit(group, single, split):
    assert single["phases"] == ["pca", "query", "log"]
    compared = 0
    for rank_result in group:
        r = rank_result[split]
        assert r["phases"] == ["pca", "query", "log"]
        assert sorted(r["tensors"]) == sorted(single["tensors"]) == SIDES
        for key in SIDES:
            torch.testing.assert_close(r["tensors"][key], group[0][split]["tensors"][key], atol=0, rtol=0)
            mine, ref = r["tensors"][key][0].double(), single["tensors"][key][0].double()
            assert mine.shape == ref.shape and mine.shape[1] == 2
            torch.testing.assert_close(mine @ mine.T, ref @ ref.T, **TOL)
            compared += 1
    assert compared == 2 * len(SIDES)


@pytest.mark.parametrize("split", ["halves", "rank0_all", "rank1_all"])
def test_sharded_raw_scores_equal_the_single_process(group, single, split):
    ref = single["scores"]
    assert ref.scores.shape == (N_QUERY, N)
    assert ref.scores.abs().max() > 0
    for rank_result in group:
        got = rank_result[split]["scores"]
        assert sorted(got.train_ids) == list(range(N)) and got.query_ids == ref.query_ids
        torch.testing.assert_close(_by_id(got), _by_id(ref), **TOL)


def test_query_pass_without_queries_on_any_rank_raises_everywhere(group):
    messages = [rank_result["none"].get("error") for rank_result in group]
    assert len(messages) == 2
    for message in messages:
        assert message is not None and "this query pass saw no queries" in message


def test_reading_the_query_grams_twice_counts_nothing_twice(tmp_path):
    """A retried fit reads the Grams again: the all-reduce must not be applied to already-reduced sums."""
    from query_helpers import worker_reduce_twice

    codes = run_group(worker_reduce_twice, tmp_path, root=str(tmp_path / "logs"), timeout=120)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    compared = 0
    for rank in range(2):
        got = torch.load(tmp_path / f"reduce_rank{rank}.pt", weights_only=False)
        (n1, g1), (n2, g2) = got["first"], got["second"]
        assert n1 == n2 == len(QUERY_SPLITS["halves"][0]) + len(QUERY_SPLITS["halves"][1])
        assert sorted(g1) == sorted(g2) == ["0", "2"]
        for name in g1:
            for side in ("out", "in"):
                assert g1[name][side].abs().max() > 0
                torch.testing.assert_close(g2[name][side], g1[name][side], atol=0, rtol=0)
                compared += 1
    assert compared == 8
