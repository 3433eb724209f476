"""Names that cannot escape their root (metrics output names), and clear errors for the cases that
used to fail with a bare message: an empty batch, a model on the meta device, query gradients of
another model."""

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.metrics import ConfigError, parse_config


@pytest.mark.parametrize("where, bad", [
    ("analysis_name", ".."), ("analysis_name", "."), ("analysis_name", "../x"), ("analysis_name", "/abs"),
    ("name", ".."), ("name", "../../../x"), ("name", "a/b"),
    ("data_split", "../../x"), ("data_split", ".."), ("data_split", "a/b"),
])
def test_metric_output_names_cannot_leave_the_output_directory(where, bad):
    entry = {"metric_name": "norm"}
    raw = {"analysis_name": "a", "metrics": [entry]}
    if where == "analysis_name":
        raw["analysis_name"] = bad
    else:
        entry[where] = bad
    with pytest.raises(ConfigError, match=where):
        parse_config(raw)


def test_safe_metric_output_names_are_accepted():
    config = parse_config({"analysis_name": "run.1", "metrics": [{"metric_name": "norm", "name": "n.2",
                                                                   "data_split": "val-a"}]})
    assert config.analysis_name == "run.1" and config.metrics[0].label == "n.2"


def _model(d_in=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 3))


def test_an_empty_batch_is_a_clear_error(tmp_path):
    model = _model()
    run = AnaLog("e", {"root_dir": str(tmp_path), "hessian": "kfac"}).watch(model)
    with pytest.raises(ValueError, match="no ids.*empty batch"):
        with run(data_id=[]):
            model(torch.zeros(0, 4)).sum().backward()
    unsaved = AnaLog("u", {"root_dir": str(tmp_path), "save": False}).watch(model)
    with pytest.raises(ValueError, match="module '0' received an empty batch"):
        with unsaved():
            model(torch.zeros(0, 4)).sum().backward()


def test_a_model_on_the_meta_device_is_refused_at_watch(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"\['0', '1'\] have parameters on the meta device"):
        AnaLog("m", {"root_dir": str(tmp_path)}).watch(model)


def test_query_gradients_of_another_model_name_the_module(tmp_path):
    model = _model()
    run = AnaLog("q", {"root_dir": str(tmp_path), "hessian": "raw", "compression": {"type": "none"}}).watch(model)
    with run(data_id=[0, 1, 2]):
        model(torch.randn(3, 4)).pow(2).sum().backward()
    model.zero_grad()
    run.eval().add_analysis({"influence": InfluenceFunction})
    # logged per example: (groups, d_out, d_in + 1 for the bias) = (1, 3, 5); this query is a Linear(6, 3)'s
    other = ([0], {"0": {"grad": torch.randn(1, 1, 3, 7)}})
    with pytest.raises(ValueError, match=r"module '0'.*shape \(1, 3, 7\) do not fit the raw curvature"):
        run.influence.compute_self_influence(other)
    with pytest.raises(ValueError, match=r"module '0'.*\(1, 3, 7\).*\(1, 3, 5\)"):
        run.influence.compute_influence_all(other)
