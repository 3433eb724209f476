"""Guards found in review: nothing is stored or counted silently wrong."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.hessian import CurvatureError
from analog.storage import LogStore


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


def _log(run, model, ids, scale=1.0):
    x = torch.randn(len(ids), 4)
    with run(data_id=ids):
        (scale * model(x).pow(2).sum()).backward()
    model.zero_grad()


def test_float16_store_refuses_values_that_overflow_float16(tmp_path):
    model = _model()
    run = AnaLog("f16", {"root_dir": str(tmp_path), "storage": {"dtype": "float16"}}).watch(model)
    with pytest.raises(FloatingPointError, match="module '0'"):
        _log(run, model, [0, 1], scale=1e7)  # finite in float32, inf in float16
    _log(run, model, [2, 3])
    run.finalize()
    store = LogStore(tmp_path / "f16" / "logs")
    assert store.ids == [2, 3] and bool(torch.isfinite(store.rows(0, 2).float()).all())


def test_empty_log_list_is_refused():
    with pytest.raises(ValueError, match="'log' is empty"):
        AnaLog("x", {"log": []})


def test_logging_into_a_fitted_project_is_refused_before_anything_is_written(tmp_path):
    model = _model()
    run = AnaLog("fit", {"root_dir": str(tmp_path), "hessian": "kfac"}).watch(model)
    _log(run, model, list(range(6)))
    run.finalize()
    again = AnaLog("fit", {"root_dir": str(tmp_path), "hessian": "kfac"}).watch(model)
    with pytest.raises(CurvatureError, match="already fitted"):
        _log(again, model, [100, 101])
    assert LogStore(tmp_path / "fit" / "logs").ids == list(range(6))


def test_damping_can_change_after_logging_but_other_settings_cannot(tmp_path):
    model = _model()
    run = AnaLog("d", {"root_dir": str(tmp_path), "hessian": "kfac"}).watch(model)
    _log(run, model, list(range(6)))
    run.eval().add_analysis({"influence": InfluenceFunction})
    with run():
        model(torch.randn(2, 4)).sum().backward()
    log = run.get_log()
    first = run.influence.compute_influence_all(log).scores
    run.update({"damping": 10.0})
    assert run.config.damping == 10.0
    assert not torch.equal(run.influence.compute_influence_all(log).scores, first)
    with pytest.raises(RuntimeError, match="only \\['damping', 'fit_bytes', 'nonfinite', 'progress'\\]"):
        run.update({"hessian": "raw"})
    with pytest.raises(ValueError, match="per_module"):
        run.influence.compute_influence_all(log, mode="cosine", per_module=True)


def test_rows_buffered_at_a_normal_exit_without_finalize_reach_the_store(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from torch import nn
        from analog import AnaLog
        model = nn.Sequential(nn.Linear(4, 3))
        run = AnaLog("exit", {{"root_dir": {str(tmp_path)!r}}}).watch(model)
        with run(data_id=list(range(8))):
            model(torch.randn(8, 4)).sum().backward()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not finalized" in done.stderr
    assert LogStore(tmp_path / "exit" / "logs").ids == list(range(8))
