"""ProjectState: the saved config is read back and checked, names stay under root_dir, state files
that cannot be trusted are named, one writer per project, and the influence computation can be
built from a curvature and a store alone."""

import json

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.hessian import CurvatureError
from analog.state import ProjectError, ProjectState
from analog.storage import LogStore, StoreError
from analog.storage.rows import fields_of, pack, split


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _log(run, model, ids):
    x = torch.sin(torch.tensor(ids, dtype=torch.float32)[:, None] * 0.7 + torch.arange(5.0))
    with run(data_id=ids):
        nn.functional.cross_entropy(model(x), torch.tensor(ids) % 3, reduction="sum").backward()
    model.zero_grad()


def _logged(tmp_path, project="p", **config):
    model = _model()
    run = AnaLog(project, {"root_dir": str(tmp_path), "hessian": "kfac", "compression": {"rank": 2}, **config})
    run.watch(model)
    for s in range(0, 12, 4):
        _log(run, model, list(range(s, s + 4)))
    run.finalize()
    return run, model


def test_saved_config_is_read_back_on_reopen(tmp_path):
    _logged(tmp_path, damping=0.5, storage={"dtype": "float16"})
    again = AnaLog("p", {"root_dir": str(tmp_path)})
    assert again.config.damping == 0.5 and again.config.storage.dtype == "float16"
    assert again.config.hessian == "kfac" and again.config.compression.rank == 2
    # runtime keys may differ and override; the seed API's update with the same values is accepted
    again.update({"damping": 2.0, "log": ["grad"], "hessian": True, "save": True})
    assert again.config.damping == 2.0 and again.config.storage.dtype == "float16"


def test_reopen_with_other_logging_settings_names_every_key(tmp_path):
    _logged(tmp_path)
    with pytest.raises(ProjectError, match=r"compression.rank: saved 2, given 3.*hessian: saved 'kfac', given 'raw'"):
        AnaLog("p", {"root_dir": str(tmp_path), "hessian": "raw", "compression": {"rank": 3}})
    again = AnaLog("p", {"root_dir": str(tmp_path)})
    with pytest.raises(ProjectError, match=r"storage.dtype: saved 'int8', given 'bfloat16'"):
        again.update({"storage": {"dtype": "bfloat16"}})


def test_reopen_with_a_model_of_other_shapes_names_the_module_at_watch(tmp_path):
    run, model = _logged(tmp_path)
    assert json.loads((run.state_path / "modules.json").read_text()) == {"0": [1, 4, 6], "2": [1, 3, 5]}
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))  # same names, module '0' is 5 -> 8
    with pytest.raises(ProjectError, match=r"module '0' \(Linear\) has \(groups, d_out, d_in\) \(1, 8, 6\).*"
                                           r"logged with \(1, 4, 6\) \(modules.json\).*watch the model the project"):
        AnaLog("p", {"root_dir": str(tmp_path)}).watch(wider)
    reopened = AnaLog("p", {"root_dir": str(tmp_path)}).watch(model)
    with pytest.raises(ProjectError, match="module '0'"):
        reopened.watch(wider)
    assert reopened.modules["0"] is model[0]  # a refused watch() leaves the watched model as it was
    # a project saved before modules.json: the saved projection's dimensions name the module
    (run.state_path / "modules.json").unlink()
    with pytest.raises(ProjectError, match=r"module '0' \(Linear\) has \(groups, d_out\) \(1, 8\).*logged with "
                                           r"\(1, 4\) \(its saved projection 0/out"):
        AnaLog("p", {"root_dir": str(tmp_path)}).watch(wider)
    # the model it was logged with, or a subset of its modules, is accepted and queries work
    AnaLog("p", {"root_dir": str(tmp_path)}).watch(model, name_filter=["2"])
    again = AnaLog("p", {"root_dir": str(tmp_path)}).watch(model).eval()
    again.add_analysis({"influence": InfluenceFunction})
    ids, _ = again.influence.compute_self_influence(again.build_log_dataloader())
    assert ids == list(range(12))


@pytest.mark.parametrize("name", ["../x", "../../x", "a/b", "/abs/path", "..", ".", "", "a\\b"])
def test_project_names_cannot_escape_root_dir(tmp_path, name):
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="one directory name under root_dir"):
        AnaLog(name, {"root_dir": str(root)})
    assert list(tmp_path.iterdir()) == []


def test_garbage_curvature_metadata_names_the_file(tmp_path):
    run, _ = _logged(tmp_path)
    meta = run.state_path / "curvature.json"
    meta.write_text("{not json")
    with pytest.raises(ProjectError, match=f"corrupt curvature metadata {meta}"):
        AnaLog("p", {"root_dir": str(tmp_path)}).watch(_model())
    meta.write_text(json.dumps({"kind": "kfac"}))
    with pytest.raises(ProjectError, match="corrupt curvature metadata"):
        AnaLog("p", {"root_dir": str(tmp_path)}).watch(_model())


def test_truncated_curvature_tensors_are_named_and_fitted_again(tmp_path):
    run, _ = _logged(tmp_path)
    fitted = {k: v.clone() for k, v in run.curvature.state.items()}
    tensors = run.state_path / "curvature.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"{tensors} is missing or does not match its record"):
        again = AnaLog("p", {"root_dir": str(tmp_path)}).watch(_model())
    assert not again.curvature.meta["finalized"]
    again.eval()  # fitted again from the store: the same curvature
    assert again.curvature.state.keys() == fitted.keys() and len(fitted) == 12
    for key, value in fitted.items():
        torch.testing.assert_close(again.curvature.state[key], value, rtol=1e-12, atol=0)
    tensors.write_bytes(b"garbage")  # written by hand: no record matches it either
    with pytest.warns(UserWarning, match="does not match its record"):
        AnaLog("p", {"root_dir": str(tmp_path)}).watch(_model())


def test_garbage_config_names_the_file(tmp_path):
    run, _ = _logged(tmp_path)
    (run.state_path / "config.json").write_text("[1, 2")
    with pytest.raises(ProjectError, match=f"corrupt project config {run.state_path / 'config.json'}"):
        AnaLog("p", {"root_dir": str(tmp_path)})


def test_one_writer_per_project_covers_fitting(tmp_path):
    model = _model()
    cfg = {"root_dir": str(tmp_path), "hessian": "kfac", "compression": {"rank": 2}}
    a = AnaLog("w", cfg).watch(model)
    b = AnaLog("w", cfg).watch(model)
    _log(a, model, [0, 1, 2, 3])
    with pytest.raises(StoreError, match="another writer"):
        _log(b, model, [10, 11])
    with pytest.raises(StoreError, match="another writer"):
        ProjectState(tmp_path, "w").acquire()  # nobody else may fit or write state meanwhile
    a.finalize()  # releases the lock
    files = {p.name: p.read_bytes() for p in (tmp_path / "w" / "state").iterdir()}
    assert {"config.json", "curvature.json", "curvature.safetensors"} <= set(files)
    b.finalize()  # B logged nothing: A's fitted curvature is left as it is
    assert {p.name: p.read_bytes() for p in (tmp_path / "w" / "state").iterdir()} == files
    ProjectState(tmp_path, "w").acquire().close()  # free again
    assert LogStore(tmp_path / "w" / "logs").ids == [0, 1, 2, 3]


def test_rows_pack_and_split_are_inverse_and_match_a_flat_concatenation():
    gen = torch.Generator().manual_seed(0)
    logs = {"a": {"grad": torch.randn(3, 2, 4, generator=gen), "forward": torch.randn(3, 5, generator=gen)},
            "b": {"grad": torch.randn(3, 1, 3, 2, generator=gen)}}
    fields = fields_of(logs)
    rows = pack(logs, fields, torch.float32)
    reference = torch.cat([logs["a"]["grad"].flatten(1), logs["a"]["forward"].flatten(1),
                           logs["b"]["grad"].flatten(1)], 1)
    assert torch.equal(rows, reference) and rows.shape == (3, 8 + 5 + 6)
    back = split(rows, fields)
    compared = 0
    for m, kinds in logs.items():
        for k, t in kinds.items():
            assert torch.equal(back[m][k], t)
            compared += 1
    assert compared == 3
    with pytest.raises(ValueError, match="differ in modules, kinds or shapes"):
        pack({"a": logs["a"]}, fields, torch.float32)


def _query(run, model):
    x = torch.cos(torch.arange(10.0).reshape(2, 5))
    with run():
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1]), reduction="sum").backward()
    model.zero_grad()
    return run.get_log()


def test_influence_from_a_curvature_and_a_store_equals_the_facade(tmp_path):
    run, model = _logged(tmp_path)
    run.eval().add_analysis({"influence": InfluenceFunction})
    model.eval()
    query = _query(run, model)
    expected = run.influence.compute_influence_all(query)
    alone = InfluenceFunction.from_parts(run.curvature, LogStore(run.log_path))
    got = alone.compute_influence_all(query)
    assert got.train_ids == expected.train_ids and len(got.train_ids) == 12
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)
    # and against the formula with the fitted curvature applied by hand: s = Σ_m g_q,m · (F̂+λI)⁻¹ g_t,m
    store = LogStore(run.log_path)
    _, train = store.batch(0, len(store))
    manual = sum(run.curvature.precondition(m, query[1][m]["grad"].double(), None).flatten(1)
                 @ train[m]["grad"].double().flatten(1).T for m in train)
    torch.testing.assert_close(got.scores.double(), manual, rtol=1e-4, atol=1e-6)


def test_bad_query_arguments_and_early_queries_are_refused(tmp_path):
    model = _model()
    run = AnaLog("q", {"root_dir": str(tmp_path), "hessian": "kfac", "compression": {"rank": 2}}).watch(model)
    run.add_analysis({"influence": InfluenceFunction})
    _log(run, model, [0, 1, 2])
    fake_query = ([0], {m: {"grad": kinds["grad"][:1]} for m, kinds in run.get_log()[1].items()})
    with pytest.raises(CurvatureError, match="not fitted yet.*finalize"):
        run.influence.compute_influence_all(fake_query)
    run.eval()
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        run.influence.compute_influence_all(fake_query, damping=-1.0)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="topk must be a positive integer"):
            run.influence.compute_influence_all(fake_query, topk=bad)
    with pytest.raises(ValueError, match="'damping' must be a number >= 0"):
        run.update({"damping": -0.1})
    assert run.influence.compute_influence_all(fake_query, topk=2).helpful_ids[0] != []


def test_a_config_saved_before_a_key_existed_reopens_with_its_default(tmp_path):
    run, _ = _logged(tmp_path)
    saved = json.loads((run.state_path / "config.json").read_text())
    del saved["compression"]["seed"], saved["nonfinite"]  # as written by an analog without these keys
    (run.state_path / "config.json").write_text(json.dumps(saved))
    again = AnaLog("p", {"root_dir": str(tmp_path), "compression": {"seed": 0, "rank": 2}})
    assert again.config.compression.seed == 0 and again.config.nonfinite == "error"
    with pytest.raises(ProjectError, match="compression.seed: saved 0, given 3"):
        AnaLog("p", {"root_dir": str(tmp_path), "compression": {"seed": 3}})


def test_an_analog_dropped_without_finalize_flushes_and_frees_its_project(tmp_path):
    """An interrupted notebook cell run again: the first AnaLog is unreachable but was never finalized."""
    model = _model()
    cfg = {"root_dir": str(tmp_path), "hessian": "kfac", "compression": {"rank": 2}}
    first = AnaLog("p", cfg).watch(model)
    first.add_analysis({"influence": InfluenceFunction})  # a reference cycle: only the collector frees it
    _log(first, model, [0, 1, 2, 3])
    _log(first, model, [4, 5, 6, 7])
    del first
    with pytest.warns(UserWarning, match="dropped without finalize"):
        again = AnaLog("p", cfg).watch(model)
    skipped = 0
    for s in range(0, 12, 4):
        if again.is_logged(list(range(s, s + 4))):
            skipped += 1
            continue
        _log(again, model, list(range(s, s + 4)))
    again.finalize()
    assert skipped == 2 and LogStore(tmp_path / "p" / "logs").ids == list(range(12))
    reference, _ = _logged(tmp_path, "ref")
    keys = reference.curvature.state.keys()
    assert again.curvature.meta["n_samples"] == 12 and again.curvature.state.keys() == keys and len(keys) == 12
    for key in keys:
        torch.testing.assert_close(again.curvature.state[key], reference.curvature.state[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("saved", ["none", "diagonal", "raw", "ekfac"])
def test_hessian_true_on_a_project_saved_with_another_kind_is_refused(tmp_path, saved):
    """True (= "auto") keeps a saved "kfac" (what True meant before "auto" existed), but not another kind:
    a project logged with hessian "none" or "raw" reopened with True names the key, as any other value does."""
    _logged(tmp_path, project=saved, hessian=saved)
    for given in (True, "auto"):
        with pytest.raises(ProjectError, match=rf"hessian: saved '{saved}', given 'auto'"):
            AnaLog(saved, {"root_dir": str(tmp_path), "hessian": given})
        with pytest.raises(ProjectError, match=rf"hessian: saved '{saved}', given 'auto'"):
            AnaLog(saved, {"root_dir": str(tmp_path)}).update({"hessian": given})
    assert AnaLog(saved, {"root_dir": str(tmp_path)}).config.hessian == saved  # not given: the saved one


def test_a_kfac_project_reopened_with_true_says_what_each_module_got(tmp_path):
    """A project fitted with K-FAC before "auto" existed reopens with True and keeps K-FAC; ``choices()``
    (documented for True) answers for it, as for an "auto" fit, instead of an AttributeError."""
    _, model = _logged(tmp_path)
    again = AnaLog("p", {"root_dir": str(tmp_path), "hessian": True})
    again.watch(model)
    assert again.config.hessian == "kfac" and again.curvature.kind == "kfac"
    assert again.curvature.choices() == {"0": "kfac", "2": "kfac"}
