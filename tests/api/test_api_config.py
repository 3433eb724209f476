"""Configuration: nothing, a dict or a YAML file; unknown keys and bad values named in the error."""

import pytest
import yaml
from torch import nn

from analog import AnaLog, Config
from analog.config import load_config


def test_none_gives_the_documented_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.log, cfg.save, cfg.hessian, cfg.nonfinite) == (["grad"], True, "none", "error")
    assert (cfg.compression.type, cfg.compression.rank, cfg.compression.seed) == ("logra", 64, 0)
    assert cfg.storage.flush_bytes == 64 * 2**20
    run = AnaLog("p")  # builds nothing on disk before logging
    assert run.config == Config() and str(run.path).endswith("analog_logs/p")


def test_dict_and_yaml_file_give_the_same_config(tmp_path):
    values = {"root_dir": str(tmp_path), "log": ["grad", "forward"], "hessian": "ekfac",
              "compression": {"rank": 8, "seed": 3}, "storage": {"dtype": "bfloat16", "flush_bytes": 4096}}
    path = tmp_path / "analog.yaml"
    path.write_text(yaml.safe_dump(values))
    from_dict, from_str, from_path = load_config(values), load_config(str(path)), load_config(path)
    assert from_dict == from_str == from_path
    assert from_dict.compression.rank == 8 and from_dict.compression.type == "logra"  # untouched keys keep defaults
    assert from_dict.storage.dtype == "bfloat16" and from_dict.storage.flush_bytes == 4096
    run = AnaLog("proj", config=str(path))
    assert run.config == from_dict and run.path == tmp_path / "proj"


def test_empty_yaml_is_defaults_and_a_non_mapping_is_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="config must be"):
        load_config(42)


@pytest.mark.parametrize("values,match", [
    ({"rnak": 3}, "'rnak'"),
    ({"compression": {"rnak": 3}}, r"\['rnak'\] in config section 'compression'"),
    ({"storage": {"dtype": "float32", "flush": 1}}, r"\['flush'\] in config section 'storage'"),
])
def test_unknown_keys_are_named(tmp_path, values, match):
    with pytest.raises(KeyError, match=match):
        load_config(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(KeyError, match=match):
        load_config(path)
    with pytest.raises(KeyError, match=match):
        AnaLog("p", {"root_dir": str(tmp_path)}).update(values)


@pytest.mark.parametrize("values,error,match", [
    ({"compression": 64}, TypeError, "section 'compression' must be a mapping"),
    ({"storage": None}, TypeError, "section 'storage' must be a mapping"),
    ({"storage": {"flush_bytes": 0}}, ValueError, "storage.flush_bytes"),
    ({"storage": {"flush_bytes": "1MB"}}, ValueError, "storage.flush_bytes"),
    ({"storage": {"dtype": "int3"}}, ValueError,
     r"storage.dtype.*'int3'; choose from \[.*'bfloat16', 'int8', 'int4', 'int2'\]"),
    ({"save": "yes"}, TypeError, "'save'"),
    ({"log": ["grads"]}, ValueError, "'grads'"),
    ({"log": 3}, TypeError, "'log'"),
    ({"hessian": "fisher"}, ValueError, "'fisher'"),
    ({"nonfinite": "ignore"}, ValueError, "'ignore'"),
    ({"compression": {"type": "sketch"}}, ValueError, r"'sketch'; choose from \['logra', 'dense', 'none'\]"),
    ({"root_dir": 3}, TypeError, "root_dir"),
    ({"damping": "big"}, ValueError, "'damping'"),
    ({"damping": -1.0}, ValueError, "'damping'"),
    ({"progress": "no"}, TypeError, "'progress'"),
])
def test_bad_values_are_named(values, error, match):
    with pytest.raises(error, match=match):
        load_config(values)


def test_hessian_booleans_and_single_log_kind():
    assert load_config({"hessian": True}).hessian == "auto"
    assert load_config({"hessian": False}).hessian == "none"
    assert load_config({"log": "forward"}).log == ["forward"]
    assert load_config({"storage": {"flush_bytes": 1e6}}).storage.flush_bytes == 1_000_000


def test_update_and_its_alias_setup(tmp_path):
    assert AnaLog.setup is AnaLog.update
    run = AnaLog("p", {"root_dir": str(tmp_path)})
    assert run.setup({"log": ["forward"], "save": False, "hessian": True}) is run
    assert (run.config.log, run.config.save, run.config.hessian) == (["forward"], False, "auto")
    run.update({"compression": {"rank": 4}})
    assert run.config.compression.rank == 4 and run.config.log == ["forward"]  # merged, not replaced
    assert run.config.root_dir == str(tmp_path)


def test_update_after_logging_started_is_refused(tmp_path):
    import torch

    model = nn.Sequential(nn.Linear(3, 2))
    run = AnaLog("p", {"root_dir": str(tmp_path), "compression": {"rank": 2}})
    run.watch(model)
    with run(data_id=[0, 1]):
        model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="after logging started"):
        run.update({"compression": {"seed": 1}})
    run.finalize()
