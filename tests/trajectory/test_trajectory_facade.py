"""Segments through the facade: the seed loop over 3 epochs, per-segment scores against separate
single-segment projects, TracIn-CP against an explicit loop over checkpoints, and bad input."""

import shutil

import pytest
import torch
from torch import nn
from trajectory_helpers import MODULES, loss_fn, make_data, make_mlp, module_grads, perturbed

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.state import ProjectError
from analog.storage import LogStore
from analog.trajectory import SegmentError, load_checkpoint
from analog.trajectory.analysis import TrajectoryInfluence


def flat(log_grads):
    return {m: g.reshape(g.shape[0], -1).double() for m, g in log_grads.items()}


def test_seed_loop_over_three_epochs_logs_one_segment_per_epoch(tmp_path):
    model, (x, y) = make_mlp(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = AnaLog("seed", {"root_dir": str(tmp_path), "compression": {"type": "none"}, "progress": False,
                          "segments": {"checkpoint": True}})
    run.update({"log": ["grad"], "hessian": True, "save": True})
    run.watch(model)
    starts, first_batches = [], []
    for epoch in range(3):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        starts.append({k: v.detach().clone() for k, v in model.named_parameters()})
        for b in range(0, len(x), 8):
            ids = order[b : b + 8]
            with run(data_id=ids):  # the seed's loop, unchanged
                loss_fn(model(x[ids]), y[ids]).backward()
            if b == 0:
                first_batches.append((ids, {m: g["grad"].clone() for m, g in run.get_log()[1].items()}))
            opt.step()
            opt.zero_grad()
    run.finalize()

    assert len(run.segments) == 3 and [r.index for r in run.segments.records] == [0, 1, 2]
    for s, record in enumerate(run.segments.records):
        store = LogStore(record.logs(run.path))
        assert sorted(store.ids) == list(range(len(x)))
        ckpt = load_checkpoint(record.checkpoint_path(run.path), run.segments.run, s)
        assert len(ckpt) == 4 and record.checkpoint["bytes"] == record.checkpoint_path(run.path).stat().st_size
        for k, v in ckpt.items():  # the checkpoint is the parameters the segment's logs start from
            torch.testing.assert_close(v, starts[s][k], rtol=0, atol=0)
        ids, logged = first_batches[s]  # ... and its first batch was logged at exactly those parameters
        expected = module_grads(model, x[ids], y[ids], starts[s])
        for m in MODULES:
            torch.testing.assert_close(flat({m: logged[m]})[m], expected[m], rtol=1e-4, atol=1e-5)
        assert (record.state(run.path) / "curvature.json").exists()

    # queries use the last segment unless asked otherwise
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    model.eval()
    xq, yq = make_data(n=3, seed=9)
    with run():
        loss_fn(model(xq), yq).backward()
    q = run.get_log()
    last = run.influence.compute_influence_all(q)
    assert run.log_path == run.segments.records[2].logs(run.path)
    assert sorted(last.train_ids) == list(range(len(x)))
    with run.at_segment(0, parameters=False):
        assert run.log_path == run.segments.records[0].logs(run.path)
        first = run.influence.compute_influence_all(q)
    assert run.log_path == run.segments.records[2].logs(run.path)
    assert not torch.allclose(first.scores, last.scores[:, [last.train_ids.index(i) for i in first.train_ids]])


def log_pass(run, model, x, y, ids):
    for b in range(0, len(x), 8):
        with run(data_id=ids[b : b + 8]):
            loss_fn(model(x[b : b + 8]), y[b : b + 8]).backward()
        model.zero_grad()


def set_params(model, params):
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(params[k])


def trajectory_project(tmp_path, model, x, y, thetas, lrs, hessian, name="traj"):
    """Logging passes at fixed parameters θ_s, one segment each (TracIn-CP's setting)."""
    model.eval()
    final = {k: v.detach().clone() for k, v in model.named_parameters()}
    run = AnaLog(name, {"root_dir": str(tmp_path), "compression": {"type": "none"}, "hessian": hessian,
                        "progress": False, "segments": {"checkpoint": True}})
    run.watch(model)
    for theta, lr in zip(thetas, lrs):
        set_params(model, theta)
        run.new_segment(lr=lr)
        log_pass(run, model, x, y, list(range(len(x))))
    set_params(model, final)
    run.eval()
    run.add_analysis({"trajectory": TrajectoryInfluence, "influence": InfluenceFunction})
    return run


def test_tracin_cp_through_the_facade_equals_an_explicit_loop_over_checkpoints(tmp_path):
    model, (x, y), (xq, yq) = make_mlp(), make_data(), make_data(n=4, seed=3)
    thetas, lrs = [perturbed(model, 0.3, seed=s) for s in range(3)], [0.5, 0.25, 0.125]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    run = trajectory_project(tmp_path, model, x, y, thetas, lrs, "none")
    scores = run.trajectory.tracin_cp(lambda: loss_fn(model(xq), yq))

    expected = torch.zeros(4, len(x), dtype=torch.float64)
    for theta, lr in zip(thetas, lrs):  # the explicit loop: torch.func gradients at each checkpoint
        gq, gt = module_grads(model, xq, yq, theta), module_grads(model, x, y, theta)
        expected += lr * sum(gq[m] @ gt[m].T for m in MODULES)
    assert len(run.segments) == 3 and scores.train_ids == list(range(len(x))) and scores.query_ids == [0, 1, 2, 3]
    torch.testing.assert_close(scores.scores.double(), expected, rtol=1e-4, atol=1e-4)
    for k, v in model.named_parameters():  # the user's model is as it was
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)
        assert v.grad is None


@pytest.mark.parametrize("hessian", ["ekfac", "raw"])
def test_per_segment_scores_equal_a_separate_single_segment_project(tmp_path, hessian):
    model, (x, y), (xq, yq) = make_mlp(), make_data(), make_data(n=3, seed=4)
    thetas, lrs = [perturbed(model, 0.3, seed=20 + s) for s in range(2)], [1.0, 0.2]
    run = trajectory_project(tmp_path, model, x, y, thetas, lrs, hessian)
    run.update({"damping": 0.05})
    query_fn = lambda: loss_fn(model(xq), yq)  # noqa: E731
    compared = 0
    for s, theta in enumerate(thetas):
        final = {k: v.detach().clone() for k, v in model.named_parameters()}
        set_params(model, theta)
        alone = AnaLog(f"alone{s}", {"root_dir": str(tmp_path), "compression": {"type": "none"},
                                      "hessian": hessian, "progress": False, "damping": 0.05})
        alone.watch(model)
        log_pass(alone, model, x, y, list(range(len(x))))
        alone.eval()
        alone.add_analysis({"influence": InfluenceFunction})
        with alone():
            query_fn().backward()
        model.zero_grad()
        reference = alone.influence.compute_influence_all(alone.get_log()).scores
        set_params(model, final)

        segment = run.trajectory.segment_wise(query_fn, segments=[s]).scores / lrs[s]
        with run.at_segment(s):  # the facade's own influence, with the segment's parameters put in
            with run():
                query_fn().backward()
            facade = run.influence.compute_influence_all(run.get_log()).scores
        torch.testing.assert_close(segment, reference, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(facade, reference, rtol=1e-5, atol=1e-6)
        compared += 1
    total = run.trajectory.segment_wise(query_fn).scores
    parts = [run.trajectory.segment_wise(query_fn, segments=[s]).scores for s in range(2)]
    torch.testing.assert_close(total, parts[0] + parts[1], rtol=1e-5, atol=1e-5)
    assert compared == 2


def test_bad_input_is_a_clear_error(tmp_path):
    model, (x, y) = make_mlp(), make_data()
    thetas = [perturbed(model, 0.3, seed=s) for s in range(2)]
    run = trajectory_project(tmp_path, model, x, y, thetas, [1.0, 1.0], "none")

    # a same-named module of another shape is refused at watch() (state/modules.json); one more module is
    # refused by at_segment, whose checkpoints hold the logged modules only
    with pytest.raises(ProjectError, match=r"module '2' \(Linear\) has \(groups, d_out, d_in\) \(1, 6, 7\)"):
        run.watch(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)))
    other = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 3))
    run.watch(other)
    with pytest.raises(SegmentError, match=r"watched modules \['0', '2', '4'\] differ from the modules \['0', '2'\]"):
        with run.at_segment(0):
            pass
    run.watch(model)
    (run.segments.records[1].checkpoint_path(run.path)).unlink()
    with pytest.raises(SegmentError, match="segment 1 has no checkpoint"):
        run.trajectory.tracin_cp(lambda: loss_fn(model(x[:2]), y[:2]))
    with pytest.raises(SegmentError, match="has segments 0..1, not 5"):
        with run.at_segment(5):
            pass

    run.mode = "log"  # as before eval(): trajectory queries need analysis mode
    with pytest.raises(RuntimeError, match=r"analysis mode: call analog.eval\(\)"):
        run.trajectory.tracin_cp(lambda: loss_fn(model(x[:2]), y[:2]))
    run.mode = "eval"

    # a segment of another run copied into the project
    other_run = trajectory_project(tmp_path, make_mlp(), x, y, thetas, [1.0, 1.0], "none", name="other")
    shutil.rmtree(run.segments.records[1].root(run.path))
    shutil.copytree(other_run.segments.records[1].root(other_run.path), run.segments.records[1].root(run.path))
    with pytest.raises(SegmentError, match="belongs to run .* different runs are mixed"):
        AnaLog("traj", {"root_dir": str(tmp_path), "compression": {"type": "none"}}).watch(model)


def test_manual_rule_and_new_segment_before_logging(tmp_path):
    model, (x, y) = make_mlp(), make_data()
    run = AnaLog("m", {"root_dir": str(tmp_path), "compression": {"type": "none"}, "progress": False,
                       "segments": {"rule": "manual"}})
    run.watch(model)
    assert run.new_segment(lr=0.3, epoch=0) == 0  # nothing logged yet: only sets lr/info
    log_pass(run, model, x, y, list(range(len(x))))
    with pytest.raises(ValueError, match="id 0 was already logged in segment 0"):
        log_pass(run, model, x, y, list(range(len(x))))
    assert run.new_segment(epoch=1) == 1
    log_pass(run, model, x, y, list(range(len(x))))
    run.finalize()
    reopened = AnaLog("m", {"root_dir": str(tmp_path), "compression": {"type": "none"}})
    reopened.watch(model)
    assert reopened.segments.summary() == [
        {"index": 0, "lr": 0.3, "info": {"epoch": 0}, "closed": True, "checkpoint_bytes": None},
        {"index": 1, "lr": 0.3, "info": {"epoch": 1}, "closed": False, "checkpoint_bytes": None}]
    assert reopened.log_path == reopened.segments.records[1].logs(reopened.path)


def test_a_reopened_project_continues_with_a_new_segment(tmp_path):
    model, (x, y) = make_mlp(), make_data()
    config = {"root_dir": str(tmp_path), "compression": {"type": "none"}, "hessian": "kfac", "progress": False}
    first = AnaLog("resume", config)
    first.watch(model)
    for _ in range(2):  # epochs 0 and 1: segments 0 and 1
        log_pass(first, model, x, y, list(range(len(x))))
    first.finalize()

    again = AnaLog("resume", config)  # a new process: the last segment (1) is current, its ids come from disk
    again.watch(model)
    assert len(again.segments) == 2 and again.log_path == again.segments.records[1].logs(again.path)
    with pytest.raises(Exception, match=r"already fitted.*analog.new_segment\(\)"):
        log_pass(again, model, x[:8], y[:8], [100 + i for i in range(8)])  # new ids into the fitted segment 1
    with pytest.warns(UserWarning, match=r"project 'resume' already holds this batch's ids in segment 1 \(logged "
                      r"by an earlier process.*starts segment 2.*holds the data twice"):
        log_pass(again, model, x, y, list(range(len(x))))  # the same ids again: segment 2
    again.finalize()
    assert len(again.segments) == 3
    for record in again.segments.records:
        assert sorted(LogStore(record.logs(again.path)).ids) == list(range(len(x)))
        assert (record.state(again.path) / "curvature.json").exists()


def test_is_logged_asks_the_current_segment(tmp_path):
    model, (x, y) = make_mlp(), make_data()
    run = AnaLog("logged", {"root_dir": str(tmp_path), "compression": {"type": "none"}, "progress": False})
    run.watch(model)
    log_pass(run, model, x, y, list(range(len(x))))
    run.finalize()
    reopened = AnaLog("logged", {"root_dir": str(tmp_path), "compression": {"type": "none"}, "progress": False})
    reopened.watch(model)
    assert reopened.is_logged(list(range(8)))  # segment 0 holds them (a resumed run skips them)
    with pytest.warns(UserWarning, match="earlier process") as caught:
        log_pass(reopened, model, x, y, list(range(len(x))))  # the next epoch: segment 1
    assert len([w for w in caught if "earlier process" in str(w.message)]) == 1  # once, not per batch
    assert len(reopened.segments) == 2 and reopened.is_logged(list(range(8)))
    reopened.new_segment(epoch=2)
    assert not reopened.is_logged(list(range(8)))  # segment 2 holds nothing yet
