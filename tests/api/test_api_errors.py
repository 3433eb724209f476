"""Bad input to the logging API: each is a clear error naming the module or id, and leaves the
store as it was. Hooks act only inside `with` blocks and watch leaves the model untouched."""

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.storage import LogStore


def make(root, **config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    run = AnaLog("p", {"root_dir": str(root), "compression": {"rank": 3}, **config})
    return model, run


def step(run, model, ids, x=None, data_id=None):
    x = torch.randn(len(ids), 5) if x is None else x
    with run(data_id=ids if data_id is None else data_id):
        nn.functional.cross_entropy(model(x), torch.arange(len(x)) % 3, reduction="sum").backward()
    model.zero_grad()


def stored(run):
    run.finalize()
    return LogStore(run.log_path)


def test_with_before_watch(tmp_path):
    model, run = make(tmp_path)
    with pytest.raises(RuntimeError, match=r"call analog.watch\(model\) before"):
        with run(data_id=[0, 1]):
            model(torch.randn(2, 5))


def test_data_id_count_differs_from_batch_size(tmp_path):
    model, run = make(tmp_path)
    run.watch(model)
    with pytest.raises(ValueError, match=r"data_id has 3 ids but module '0' received a batch of 4"):
        step(run, model, [0, 1, 2], x=torch.randn(4, 5))
    step(run, model, [0, 1, 2, 3])  # the block was left cleanly: logging goes on
    assert stored(run).ids == [0, 1, 2, 3]


@pytest.mark.parametrize("data_id,error,match", [
    ([0.5, 1.5], TypeError, "ids must be ints or strings"),
    ([True, False], TypeError, "ids must be ints or strings"),
    (torch.tensor(3), ValueError, "scalar"),
    ({"a": 1}, TypeError, "data_id must be"),
])
def test_bad_data_id_types(tmp_path, data_id, error, match):
    model, run = make(tmp_path)
    run.watch(model)
    with pytest.raises(error, match=match):
        step(run, model, [0, 1], data_id=data_id)


def test_saving_without_data_id(tmp_path):
    model, run = make(tmp_path)
    run.watch(model)
    with pytest.raises(ValueError, match="pass data_id"):
        with run():
            pass


def test_a_query_block_while_still_logging_says_to_call_eval(tmp_path):
    # a query gradient computed after logging but without analog.eval(): the error keeps the data_id advice
    # (for a forgotten id while logging) and says what a query needs
    model, run = make(tmp_path)
    run.watch(model)
    step(run, model, [0, 1])
    with pytest.raises(ValueError, match=r"pass data_id=\.\.\..*to compute a query gradient.*call analog\.eval\(\)"):
        with run():
            nn.functional.cross_entropy(model(torch.randn(2, 5)), torch.tensor([0, 1]), reduction="sum").backward()
    step(run, model, [2, 3])  # logging goes on
    assert stored(run).ids == [0, 1, 2, 3]


def test_duplicate_ids_name_the_id_and_leave_no_trace(tmp_path):
    # segments rule "manual": a repeated id is an error (rule "repeat" would start a new segment)
    model, run = make(tmp_path, segments={"rule": "manual"})
    run.watch(model)
    step(run, model, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="id 2 was already logged in segment 0; ids are unique within a segment"):
        step(run, model, [4, 5, 2, 6])
    with pytest.raises(ValueError, match="id 'x' appears twice"):
        step(run, model, ["x", 7, "x"])
    step(run, model, [4, 5, 6, "x"])  # none of the refused ids were recorded
    assert stored(run).ids == [0, 1, 2, 3, 4, 5, 6, "x"]


def test_segments_rule_changed_by_update_after_watch_takes_effect(tmp_path):
    """update({"segments": {"rule": ...}}) between watch() and the first block is not ignored: watched under
    "manual" and switched to "repeat", a repeated id starts segment 1; once logging started the rule is
    fixed (an error naming the key), and an unknown rule is refused."""
    model, run = make(tmp_path, segments={"rule": "manual"})
    run.watch(model)
    with pytest.raises(ValueError, match="segments.rule"):
        run.update({"segments": {"rule": "sometimes"}})
    run.update({"segments": {"rule": "repeat"}})
    assert run.segments.rule == "repeat"
    step(run, model, [0, 1])
    step(run, model, [1, 2])
    assert len(run.segments) == 2
    with pytest.raises(RuntimeError, match=r"update\(\) of \['segments.rule'\] after logging started"):
        run.update({"segments": {"rule": "manual"}})
    step(run, model, [2, 3])  # still "repeat": id 2 again starts segment 2
    assert run.segments.rule == "repeat" and len(run.segments) == 3


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])  # float: checked by AnaLog; int8/int4: by the writer
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_an_error_naming_module_and_ids(tmp_path, bad, dtype):
    model, run = make(tmp_path, storage={"dtype": dtype})
    run.watch(model)
    step(run, model, [0, 1, 2, 3])
    x = torch.randn(6, 5)
    x[2, 1] = bad
    x[4, 0] = bad
    with pytest.raises(FloatingPointError, match=r"module '\d'.*ids \[12, 14\].*nothing of this batch was stored"):
        step(run, model, list(range(10, 16)), x=x)
    step(run, model, list(range(10, 16)))  # the failed batch's ids are still free
    store = stored(run)
    assert store.ids == [0, 1, 2, 3] + list(range(10, 16))
    assert torch.isfinite(store.rows(0, len(store))).all()



def test_watch_bare_layer_says_wrap_it_without_contradiction(tmp_path):
    _, run = make(tmp_path)
    with pytest.raises(ValueError) as error:
        run.watch(nn.Linear(3, 2))
    message = str(error.value)
    assert "the model itself is a bare Linear" in message and "nn.Sequential(model)" in message
    assert "loggable types" not in message and "torch.nn.modules.linear.Linear" not in message


def test_watch_name_filter_matching_nothing_leads_with_filter_and_module_names(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(25)])
    _, run = make(tmp_path)
    with pytest.raises(ValueError, match=r"^watch\(\) selected no module: name_filter=\['encoder.layer'\]") as error:
        run.watch(model, name_filter=["encoder.layer"])
    message = str(error.value)
    assert "'0' (Linear), '1' (Linear)" in message and "'19' (Linear), and 5 more" in message
    assert "'20'" not in message and "transformers" not in message and len(message) < 600


def test_watch_exclude_pattern_matching_nothing_is_an_error(tmp_path):
    model, run = make(tmp_path)
    with pytest.raises(ValueError, match=r"\['lm_head'\] matched no module of Sequential.*'0' \(Linear\)"):
        run.watch(model, exclude=["0", "lm_head"])
    run.watch(model, exclude=["1", "*2"])  # substring and glob patterns that match still work, as before
    assert list(run.modules) == ["0"]

def test_nonfinite_allow_stores_the_batch(tmp_path):
    model, run = make(tmp_path, nonfinite="allow")
    run.watch(model)
    x = torch.randn(4, 5)
    x[1, 0] = float("nan")
    step(run, model, [0, 1, 2, 3], x=x)
    store = stored(run)
    assert store.ids == [0, 1, 2, 3]
    finite = torch.isfinite(store.rows(0, 4)).all(1)
    assert finite.tolist() == [True, False, True, True]


def test_watch_errors_name_the_module(tmp_path):
    model, run = make(tmp_path)
    with pytest.raises(ValueError, match="selected no module"):
        run.watch(model, name_filter=["nope"])
    with pytest.raises(TypeError, match="Tanh"):
        run.watch(model, type_filter=[nn.Tanh])
    with pytest.raises(TypeError, match=r"module '1' \(Tanh\)"):
        run.watch(model, name_filter=["1"])
    with pytest.raises(ValueError, match="wrap it"):
        run.watch(nn.Linear(2, 2))


def test_watch_leaves_the_model_untouched_and_hooks_act_only_inside_with(tmp_path):
    model, run = make(tmp_path)
    model[0].bias.requires_grad_(False)
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    modules = list(model.modules())
    run.watch(model, name_filter=["2"])
    assert list(run.modules) == ["2"]
    assert list(model.modules()) == modules
    assert all(p.requires_grad == before[n][1] and torch.equal(p, before[n][0]) for n, p in model.named_parameters())
    assert all(not m._forward_hooks for m in model.modules()), "no hook outside a with block"
    step(run, model, [0, 1])
    ids, logs = run.get_log()
    assert all(not m._forward_hooks for m in model.modules())
    snapshot = logs["2"]["grad"].clone()
    # passes outside the block change nothing: not the last log, not the store
    nn.functional.cross_entropy(model(torch.randn(3, 5)), torch.tensor([0, 1, 2])).backward()
    assert run.get_log()[0] == [0, 1] and torch.equal(run.get_log()[1]["2"]["grad"], snapshot)
    assert stored(run).ids == [0, 1]


def test_a_refused_batch_leaves_the_curvature_untouched(tmp_path):
    """K-FAC factors are gathered during backward; a batch refused for NaN must not reach them."""
    results = []
    for project, poisoned in (("clean", False), ("poisoned", True)):
        model, _ = make(tmp_path)
        run = AnaLog(project, {"root_dir": str(tmp_path), "compression": {"rank": 3}, "hessian": "kfac"})
        run.watch(model)
        if poisoned:
            x = torch.randn(4, 5)
            x[1, 0] = float("nan")
            with pytest.raises(FloatingPointError):
                step(run, model, [0, 1, 2, 3], x=x)
            with pytest.raises(ZeroDivisionError):  # an exception in the block drops its factors too
                with run(data_id=[0, 1, 2, 3]):
                    model(torch.randn(4, 5)).sum().backward()
                    raise ZeroDivisionError
        step(run, model, [4, 5, 6, 7], x=torch.ones(4, 5))
        run.finalize()
        results.append(run.curvature)
    clean, poisoned = results
    assert poisoned.meta["n_samples"] == clean.meta["n_samples"] == 4
    assert clean.state.keys() == poisoned.state.keys() and clean.state
    for k in clean.state:
        assert torch.isfinite(poisoned.state[k]).all(), k
        torch.testing.assert_close(poisoned.state[k], clean.state[k])


def test_finalize_inside_the_pca_statistics_pass_says_to_use_the_scheduler(tmp_path):
    model, run = make(tmp_path, compression={"rank": 3, "init": "pca"})
    run.watch(model)
    step(run, model, [0, 1, 2, 3])  # without AnaLogScheduler this batch only feeds the PCA statistics
    with pytest.raises(RuntimeError, match=r"init='pca'.*statistics pass and nothing was logged.*AnaLogScheduler"):
        run.finalize()
    assert not (run.log_path / "store.json").exists()
    run.next_pass()  # the documented way on: the same batch logged again is stored
    step(run, model, [0, 1, 2, 3])
    assert len(stored(run)) == 4
