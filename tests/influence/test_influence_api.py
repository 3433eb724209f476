"""Behaviour of the influence API: consistency, immutability, top-k, modes, persistence, errors."""

import pytest
import torch
from conftest import make_data, make_mlp, query_log, run_logging

from analog import AnaLog
from analog.analysis import InfluenceFunction, InfluenceScores
from analog.hessian import CurvatureError
from analog.state import ProjectError


@pytest.fixture
def fitted(tmp_path):
    model, (x, y) = make_mlp(), make_data()
    # float32: self-influence over the stored rows is compared with that of the recomputed query logs to 1e-5
    run = run_logging(model, x, y, tmp_path, "api", "ekfac", compression={"type": "logra", "rank": 4},
                      storage={"dtype": "float32"})
    return run, model, x, y


def test_self_influence_is_the_diagonal_of_pairwise_influence(fitted):
    run, model, x, y = fitted
    log = query_log(run, model, x[:10], y[:10])
    pairwise = run.influence.compute_influence(log, log).scores
    self_scores = run.influence.compute_self_influence(log)
    torch.testing.assert_close(self_scores, torch.diagonal(pairwise), rtol=1e-5, atol=1e-5)
    ids, loader_scores = run.influence.compute_self_influence(run.build_log_dataloader(batch_size=7))
    assert ids == list(range(48))
    torch.testing.assert_close(loader_scores[:10], self_scores, rtol=1e-5, atol=1e-5)


def test_repeated_queries_are_identical_and_do_not_mutate_state(fitted):
    run, model, x, y = fitted
    before = {k: v.clone() for k, v in run.curvature.state.items()}
    log = query_log(run, model, x[:5], y[:5])
    first = run.influence.compute_influence_all(log, damping=0.3).scores
    run.influence.compute_influence_all(log, damping=None)
    second = run.influence.compute_influence_all(log, damping=0.3).scores
    assert torch.equal(first, second)
    assert len(before) > 0 and before.keys() == run.curvature.state.keys()
    assert all(torch.equal(before[k], run.curvature.state[k]) for k in before)


def test_topk_mode_matches_the_full_matrix(fitted):
    run, model, x, y = fitted
    log = query_log(run, model, x[:3], y[:3])
    full = run.influence.compute_influence_all(log, run.build_log_dataloader(batch_size=5))
    top = run.influence.compute_influence_all(log, run.build_log_dataloader(batch_size=5), topk=4)
    expected = full.topk(4)
    assert top.helpful_ids == expected["helpful"] and top.harmful_ids == expected["harmful"]
    torch.testing.assert_close(top.helpful_scores, full.scores.topk(4, dim=1).values)
    assert top.n_train == 48


def test_modes_and_per_module_breakdown(fitted):
    run, model, x, y = fitted
    q, t = query_log(run, model, x[:4], y[:4]), query_log(run, model, x[4:9], y[4:9])
    dot = run.influence.compute_influence(q, t, per_module=True)
    assert sorted(dot.per_module) == ["0", "2"]
    torch.testing.assert_close(sum(dot.per_module.values()), dot.scores)
    sq, st = run.influence.compute_self_influence(q), run.influence.compute_self_influence(t)
    cosine = run.influence.compute_influence(q, t, mode="cosine").scores
    torch.testing.assert_close(cosine, dot.scores / (sq[:, None] * st[None, :]).sqrt(), rtol=1e-4, atol=1e-5)
    l2 = run.influence.compute_influence(q, t, mode="l2").scores
    torch.testing.assert_close(l2, -(sq[:, None] + st[None, :] - 2 * dot.scores), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown influence mode"):
        run.influence.compute_influence(q, t, mode="euclid")


def test_scores_save_and_load(fitted, tmp_path):
    run, model, x, y = fitted
    res = run.influence.compute_influence_all(query_log(run, model, x[:3], y[:3]), per_module=True)
    res.save(tmp_path / "scores")
    back = InfluenceScores.load(tmp_path / "scores")
    assert torch.equal(back.scores, res.scores) and back.train_ids == res.train_ids
    assert back.query_ids == res.query_ids and sorted(back.per_module) == ["0", "2"]


def test_state_restores_in_a_new_analog_object(fitted):
    run, model, x, y = fitted
    log = query_log(run, model, x[:3], y[:3])
    expected = run.influence.compute_influence_all(log).scores
    again = AnaLog(project="api", config={"root_dir": run.config.root_dir,
                                          "compression": {"type": "logra", "rank": 4}})
    again.update({"hessian": "ekfac"}).watch(model).eval()
    again.add_analysis({"influence": InfluenceFunction})
    got = again.influence.compute_influence_all(query_log(again, model, x[:3], y[:3])).scores
    torch.testing.assert_close(got, expected)


def test_query_from_another_projection_is_a_clear_error(fitted, tmp_path):
    run, model, x, y = fitted
    other = AnaLog(project="other", config={"root_dir": str(tmp_path), "compression": {"type": "logra", "rank": 3}})
    other.update({"hessian": "none", "save": False}).watch(model).eval()
    log = query_log(other, model, x[:2], y[:2])
    with pytest.raises(ValueError, match="different projections"):
        run.influence.compute_influence_all(log)


def test_unfitted_hessian_is_a_clear_error(tmp_path):
    model, (x, y) = make_mlp(), make_data(n=8)
    run = AnaLog(project="unfit", config={"root_dir": str(tmp_path)}).update({"hessian": "kfac"}).watch(model)
    run.add_analysis({"influence": InfluenceFunction})
    with run(data_id=list(range(8))):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    with pytest.raises(CurvatureError, match="finalize"):
        run.influence.compute_influence(run.get_log(), run.get_log())
    run.finalize()
    assert run.influence.compute_influence(run.get_log(), run.get_log()).scores.shape == (8, 8)


def test_self_influence_before_finalize_names_the_cause(tmp_path):
    # in the logging phase the store is empty (nothing flushed yet): refused before any batch is read
    model, (x, y) = make_mlp(), make_data(n=8)
    run = AnaLog(project="early", config={"root_dir": str(tmp_path)}).update({"hessian": "kfac"}).watch(model)
    run.add_analysis({"influence": InfluenceFunction})
    with run(data_id=list(range(8))):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    with pytest.raises(CurvatureError, match=r"logs are not finalized.*'kfac' curvature is not fitted yet.*"
                                             r"call analog\.finalize\(\)"):
        run.influence.compute_self_influence(run.build_log_dataloader())
    run.finalize()
    ids, scores = run.influence.compute_self_influence(run.build_log_dataloader())
    assert ids == list(range(8)) and scores.shape == (8,)
    with pytest.raises(ValueError, match="the log loader yielded no batches: nothing to score"):
        run.influence.compute_self_influence([])


def test_reopened_project_queried_without_watch_says_to_watch(fitted):
    run, model, x, y = fitted
    again = AnaLog(project="api", config={"root_dir": run.config.root_dir})
    with pytest.warns(UserWarning, match=r"eval\(\) on AnaLog 'api', which watches no module.*call "
                                         r"analog\.watch\(model\) first"):
        again.eval()  # nothing watched: eval() loads no curvature, and says so
    again.add_analysis({"influence": InfluenceFunction})
    with pytest.raises(CurvatureError, match=r"watches no module.*call analog\.watch\(model\) first "
                                             r"\(the project's modules: \['0', '2'\]\)") as error:
        again.influence.compute_self_influence(again.build_log_dataloader())
    assert "no curvature is not" not in str(error.value)
    again.watch(model).eval()
    ids, _ = again.influence.compute_self_influence(again.build_log_dataloader())
    assert ids == list(range(48))


def test_reopening_a_project_with_another_hessian_is_a_clear_error(fitted):
    run, model, x, y = fitted
    again = AnaLog(project="api", config={"root_dir": run.config.root_dir,
                                          "compression": {"type": "logra", "rank": 4}})
    with pytest.raises(ProjectError, match="hessian: saved 'ekfac', given 'kfac'"):
        again.update({"hessian": "kfac"}).watch(model)


def test_queries_from_a_model_in_training_mode_warn(fitted):
    run, model, x, y = fitted
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        query_log(run, model, x[:2], y[:2])
    model.eval()


def test_result_reprs_are_short_summaries_not_the_whole_matrix():
    from analog.analysis.results import TokenInfluence, TopKInfluence

    scores = InfluenceScores(torch.randn(3, 1000), ["a", "b", "c"], list(range(1000)))
    text = repr(scores)
    assert text.startswith("InfluenceScores(3 queries x 1000 training examples")
    assert "train_ids=[0, 1, 2, 3, 4, ...] (1000)" in text and "999" not in text and len(text) < 200
    top = TopKInfluence(["a"], [[7, 8]], torch.zeros(1, 2), [[1, 2]], torch.zeros(1, 2), n_train=1000)
    assert repr(top).startswith("TopKInfluence(1 queries, top 2 helpful and harmful of 1000 training examples")
    tokens = TokenInfluence(torch.zeros(2, 7, 50), ["a", "b"], list(range(50)))
    assert repr(tokens).startswith("TokenInfluence(2 queries x 7 positions x 50 training examples")


def test_topk_of_results_refuses_what_it_cannot_give():
    from analog.analysis.results import TopKInfluence

    top = TopKInfluence(["q"], [[7, 8]], torch.tensor([[2.0, 1.0]]), [[1, 2]], torch.tensor([[-2.0, -1.0]]), n_train=10)
    assert top.topk() == {"helpful": [[7, 8]], "harmful": [[1, 2]]}
    assert top.topk(1) == {"helpful": [[7]], "harmful": [[1]]}
    with pytest.raises(ValueError, match=r"only the top 2 of 10 .* topk=3"):
        top.topk(3)
    everything = TopKInfluence(["q"], [[7, 8]], torch.zeros(1, 2), [[1, 2]], torch.zeros(1, 2), n_train=2)
    assert everything.topk(5) == {"helpful": [[7, 8]], "harmful": [[1, 2]]}  # there are no more
    scores = InfluenceScores(torch.tensor([[0.0, 3.0, -1.0]]), ["q"], ["a", "b", "c"])
    assert scores.topk(5) == {"helpful": [["b", "a", "c"]], "harmful": [["c", "a", "b"]]}
    for bad in (top, scores):
        with pytest.raises(ValueError, match="k >= 1"):
            bad.topk(0)
