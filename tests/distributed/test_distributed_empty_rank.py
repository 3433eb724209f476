"""A rank that gets no batch in a pass, on a real 2-process gloo group, against one process over the union.

A rank without data must contribute zeros to every reduction of the pass (the K-FAC sums of a statistics
pass, the fitted projections, the curvature of the logging pass, in memory or from the store) and still
score its (possibly empty) share of the store, so that every result equals one process that logged both
ranks' ids; where no rank has data, every rank raises the same error. Compared with atol=1e-5,
rtol=1e-4: the projections (as P Pᵀ where an eigenvector's sign is free: pca, whiten_pca), the stored
rows (as their Gram matrix by id, which those signs leave unchanged), the curvature statistics, and the
scores by training id. Collectives time out after 10 s and the group is killed after 90 s, so a rank left
alone in a collective fails the test instead of hanging it.
"""

import pytest
import torch
from distributed_helpers import N_QUERY, errors, run_group
from empty_rank_helpers import ERROR_SCENARIOS, SCENARIOS, SEGMENTS, single_process, union, worker_empty_rank

from analog.hessian import Curvature
from analog.storage import LogStore
from analog.trajectory.layout import load_records

TOL = dict(atol=1e-5, rtol=1e-4)
SIDES = ["0/in", "0/out", "2/in", "2/out"]
#: curvature state keys that do not depend on the signs of the projection's columns
SIGN_FREE = {"kfac": ["eA", "eS"], "ekfac": ["eA", "eS", "corrected"], "raw": ["evals"], "diagonal": ["diag"]}
AUTO = {"0": "kfac", "2": "raw"}  # what hessian auto fits for each module of the auto scenario


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("empty_rank_ddp")
    codes = run_group(worker_empty_rank, tmp, root=str(tmp / "logs"), timeout=90, pg_timeout=10)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp)}"
    return tmp / "logs", [torch.load(tmp / f"empty_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty_rank_single")
    return root, single_process(root)


def _init(name):
    return SCENARIOS[name]["config"]["compression"]["init"]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if _init(n) != "random"])
def test_statistics_pass_fits_the_single_process_projections(group, single, name):
    ref = single[1][name]
    assert ref["phases"] == ["pca", "log"]
    compared = 0
    for result in group[1]:
        got = result[name]
        assert got["phases"] == ["pca", "log"]
        assert sorted(got["tensors"]) == sorted(ref["tensors"]) == SIDES
        for key in SIDES:
            torch.testing.assert_close(got["tensors"][key], group[1][0][name]["tensors"][key], atol=0, rtol=0)
            mine, theirs = got["tensors"][key][0].double(), ref["tensors"][key][0].double()
            assert mine.shape == theirs.shape and mine.shape[1] == 2
            if _init(name) == "whiten":  # root @ seeded Gaussian: no sign is free
                torch.testing.assert_close(mine, theirs, **TOL)
            torch.testing.assert_close(mine @ mine.T, theirs @ theirs.T, **TOL)
            compared += 1
    assert compared == 2 * len(SIDES)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if SCENARIOS[n]["config"]["save"]])
def test_stored_rows_equal_the_single_process(group, single, name):
    ids = union(SCENARIOS[name]["log"])
    ddp, one = LogStore(group[0] / name / "logs"), LogStore(single[0] / name / "logs")
    assert sorted(ddp.ids) == sorted(one.ids) == ids
    rows = [torch.stack([s.rows(s.position(i), s.position(i) + 1)[0] for i in ids]).double() for s in (ddp, one)]
    assert rows[0].shape == rows[1].shape and rows[0].shape[0] == len(ids) and rows[0].abs().max() > 0
    if _init(name) in ("random", "whiten"):
        torch.testing.assert_close(rows[0], rows[1], **TOL)
    torch.testing.assert_close(rows[0] @ rows[0].T, rows[1] @ rows[1].T, **TOL)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_curvature_equals_the_single_process(group, single, name):
    ref = single[1][name]
    def keys(m):
        kind = SCENARIOS[name]["config"]["hessian"]
        kind = AUTO[m] if kind == "auto" else kind
        return SIGN_FREE[kind] + (["A", "S"] if kind in ("kfac", "ekfac") and _init(name) in ("random", "whiten")
                                  else [])

    compared = 0
    for result in group[1]:
        got = result[name]
        assert got["finalized"] and ref["finalized"]
        assert got["n_samples"] == ref["n_samples"] == len(union(SCENARIOS[name]["log"]))
        assert sorted(got["state"]) == sorted(ref["state"])
        for m in ["0", "2"]:
            for key in keys(m):
                assert ref["state"][f"{m}/{key}"].abs().max() > 0
                torch.testing.assert_close(got["state"][f"{m}/{key}"], ref["state"][f"{m}/{key}"], **TOL)
                compared += 1
        assert got["segment_modules"] == ["0", "2"], "the segment record names the modules whichever rank logged"
    assert compared == 2 * (len(keys("0")) + len(keys("2")))


def _by_id(scores):
    order = sorted(range(len(scores.train_ids)), key=lambda j: scores.train_ids[j])
    return scores.scores[:, order]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if SCENARIOS[n]["config"]["save"]])
def test_sharded_scores_equal_the_single_process(group, single, name):
    ref = single[1][name]["scores"]
    ids = union(SCENARIOS[name]["log"])
    assert ref.scores.shape == (N_QUERY, len(ids)) and ref.scores.abs().max() > 0
    for result in group[1]:
        got = result[name]["scores"]
        assert sorted(got.train_ids) == ids and got.query_ids == ref.query_ids
        torch.testing.assert_close(_by_id(got), _by_id(ref), **TOL)
        # top-k merged over the ranks' shares (one of them may be empty)
        top, ref_top = result[name]["top"], single[1][name]["top"]
        assert top.n_train == len(ids) and len(top.helpful_ids) == N_QUERY
        assert top.helpful_ids == ref_top.helpful_ids and top.harmful_ids == ref_top.harmful_ids
        torch.testing.assert_close(top.helpful_scores, ref_top.helpful_scores, **TOL)


def test_no_data_on_any_rank_gives_the_same_error_everywhere(group):
    messages = {key: [result[key]["error"] for result in group[1]] for key in ERROR_SCENARIOS}
    assert len(messages) == 3
    for key in ("stats_nobody", "finalize_in_stats_pass"):
        assert messages[key][0] == messages[key][1], f"{key}: the ranks raised different errors {messages[key]}"
    assert messages["stats_nobody"][0].startswith("RuntimeError: LoGra init='pca' needs a first statistics pass")
    assert messages["stats_nobody"][0].endswith("this statistics pass saw no data on any rank")
    assert "nothing was logged; call next_pass()" in messages["finalize_in_stats_pass"][0]
    # nothing logged anywhere: finalize fits nothing, on every rank, as one process does
    assert messages["log_nobody"] == [None, None]
    for result in group[1]:
        assert result["log_nobody_state"] == {"finalized": False, "n_samples": 0}


def test_segments_where_one_rank_logs_nothing_equal_the_single_process(group, single):
    """An explicit new_segment() on every rank, with rank 0 idle in segment 0 and rank 1 idle in segment 1."""
    ddp, one = load_records(group[0] / "segments"), load_records(single[0] / "segments")
    assert [(r.index, r.lr, r.closed, r.modules) for r in ddp] == [(r.index, r.lr, r.closed, r.modules) for r in one] \
        == [(0, 1.0, True, ["0", "2"]), (1, 0.5, False, ["0", "2"])]
    compared = 0
    for k, (mine, ref) in enumerate(zip(ddp, one)):
        assert sorted(LogStore(mine.logs(group[0] / "segments")).ids) == union(SEGMENTS[k])
        got, want = Curvature.load(mine.state(group[0] / "segments")), Curvature.load(ref.state(single[0] / "segments"))
        assert got.meta["n_samples"] == want.meta["n_samples"] == len(union(SEGMENTS[k]))
        for key in ("0/A", "0/S", "2/A", "2/S"):
            torch.testing.assert_close(got.state[key], want.state[key], **TOL)
            compared += 1
    assert compared == 8


def test_segment_without_rank_0_has_no_checkpoint_error_on_every_rank(group):
    messages = [result["no_checkpoint"]["error"] for result in group[1]]
    assert len(messages) == 2 and messages[0] == messages[1]
    assert messages[0].startswith("SegmentError: segment 0 has no checkpoint: rank 0 writes")
    assert [result["no_checkpoint_refit"] for result in group[1]] == [32, 32]


def test_an_error_in_one_ranks_share_is_raised_on_every_rank(group, single):
    """Rank 0 fails alone while fitting from its share of the store and while scoring its share."""
    results = [result["rank_fails"] for result in group[1]]
    expected = {"refit": "fitting diagonal failed on rank 0 (OutOfMemoryError: injected on rank 0)",
                "scores": "scoring a share of the store failed on rank 0 (OutOfMemoryError: injected on rank 0)"}
    for result in results:
        assert {key: result[key] for key in expected} == expected
        # afterwards the same calls succeed on every rank: nothing was left waiting in the group
        assert result["refit_after"] is None
        reference = single[1]["pca_stats_rank1"]["scores"]
        torch.testing.assert_close(_by_id(result["scores_after"]), _by_id(reference), **TOL)
    assert len(results) == 2
