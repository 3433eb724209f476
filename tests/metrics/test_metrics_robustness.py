"""Hostile or broken run files give one clear error naming the file, never a traceback; a config step
absent on disk is skipped with a loud warning; ``analog metrics --dir DIR`` alone runs a default set."""

import csv
import json

import pytest
import torch
from metrics_fixtures import tiny_state, write_pico_step

from analog.checkpoints import CheckpointError, load_tensor_file
from analog.cli import main
from analog.metrics.cli import DEFAULT_METRICS

OV = {
    "metric_name": "condition_number",
    "components": [
        {
            "component_name": "ov_circuit",
            "layer_suffixes": {"output_layer": "attention.o_proj", "value_layer": "attention.v_proj"},
        }
    ],
}


def _cli(capsys, *args):
    code = main(["metrics", "--quiet", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_byte_pt_file_is_a_clear_error_naming_it(tmp_path, seed, allow_pickle):
    path = tmp_path / "step_5.pt"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"step_5\.pt: (not a readable PyTorch checkpoint|corrupt)") as info:
        load_tensor_file(path, allow_pickle=allow_pickle)
    assert "allow_pickle" not in str(info.value)  # garbage is not refused code: no advice to run it


def test_random_byte_checkpoint_through_the_cli(tmp_path, capsys):
    (tmp_path / "step_1.pt").write_bytes(bytes(range(256)) * 8)
    code, err = _cli(capsys, "--dir", tmp_path, "--metrics", "gini", "--output-dir", tmp_path / "out")
    assert code == 2 and "step_1.pt: not a readable PyTorch checkpoint" in err and "Traceback" not in err


def _pico_run(tmp_path):
    run = tmp_path / "run"
    folder = run / "checkpoints" / "step_0"
    folder.mkdir(parents=True)
    state = {
        "model.layers.0.attention.o_proj.weight": torch.randn(8, 8),
        "model.layers.0.attention.v_proj.weight": torch.randn(8, 8),
    }
    torch.save(state, folder / "model.pt")
    (folder / "learning_dynamics").mkdir()
    torch.save(state, folder / "learning_dynamics" / "val_weights.pt")
    return run


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("training_config.yaml", "model: !!python/object/apply:os.system ['echo hi']\n", "not a readable YAML file"),
        ("training_config.yaml", "model: [1, 2\n", "not a readable YAML file"),
        ("training_config.yaml", "- just\n- a list\n", "expected a mapping"),
        ("training_config.yaml", "model: {attention_n_heads: two}\n", "'model.attention_n_heads' must be"),
        ("config.json", '{"num_attention_heads": 2,,}', "not a readable JSON file"),
        ("config.json", "\x00\xff garbage", "not a readable JSON file"),
        ("config.json", "[1, 2]", "expected a mapping"),
    ],
)
def test_broken_model_config_names_the_file(tmp_path, capsys, name, text, message):
    run = _pico_run(tmp_path)
    (run / name).write_text(text, encoding="latin-1")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"analysis_name": "ov", "metrics": [OV]}))
    code, err = _cli(capsys, "--config", cfg, "--run-path", run, "--output-dir", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert f"{run / name}" in err and message in err, err


def test_broken_model_config_is_not_read_when_no_metric_needs_it(tmp_path, capsys):
    run = _pico_run(tmp_path)
    (run / "training_config.yaml").write_text("model: !!python/name:os.system\n")
    code, err = _cli(capsys, "--dir", run, "--metrics", "gini", "--output-dir", tmp_path / "out")
    assert code == 0, err


def test_garbage_shard_index_names_the_file(tmp_path, capsys):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    torch.save(tiny_state(0), folder / "pytorch_model-00001.bin")
    (folder / "pytorch_model.bin.index.json").write_text("{not json")
    code, err = _cli(capsys, "--dir", tmp_path, "--metrics", "gini", "--output-dir", tmp_path / "out")
    assert code == 2 and "pytorch_model.bin.index.json: not a readable shard index" in err
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    code, err = _cli(capsys, "--dir", tmp_path, "--metrics", "gini", "--output-dir", tmp_path / "out")
    assert code == 2 and "shard names must be plain file names" in err


def test_config_step_absent_on_disk_warns_and_is_skipped(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (0, 10, 20):
        write_pico_step(run, step, seed=step)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"analysis_name": "a", "steps": [0, 10, 15, 20], "metrics": [{"metric_name": "gini"}]}))
    with pytest.warns(UserWarning, match=r"step\(s\) \[15\] not found.*available steps: 0, 10, 20"):
        code, err = _cli(capsys, "--config", cfg, "--run-path", run, "--output-dir", tmp_path / "out")
    assert code == 0, err
    with open(tmp_path / "out" / "a" / "metrics.csv") as f:
        assert sorted({int(r["step"]) for r in csv.DictReader(f)}) == [0, 10, 20]
    assert json.loads((tmp_path / "out" / "a" / "analysis_config.json").read_text())["missing_steps"] == [15]


def test_dir_alone_runs_the_default_metric_set(tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (1, 2, 3):
        torch.save(tiny_state(step), ckpts / f"step_{step}.pt")
    assert main(["metrics", "--dir", str(ckpts), "--output-dir", str(tmp_path / "out")]) == 0
    assert "no --metrics or --config given" in capsys.readouterr().err
    with open(tmp_path / "out" / "checkpoint_metrics" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["metric"] for r in rows} == set(DEFAULT_METRICS)
    assert len(DEFAULT_METRICS) == 6
    assert {int(r["step"]) for r in rows} == {1, 2, 3}


@pytest.mark.parametrize("name", ["../../x", "a/b", "..\\x", "/abs", "x y"])
def test_entry_name_cannot_leave_the_output_directory(name):
    from analog.metrics import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"metrics\[0\]\.name: expected a file-name-safe label"):
        parse_config({"analysis_name": "a", "metrics": [{"metric_name": "gini", "name": name}]})
    assert parse_config({"analysis_name": "a", "metrics": [{"metric_name": "gini", "name": "g.v=1+2"}]})


def test_quick_form_without_whole_model(tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save(tiny_state(1), ckpts / "step_1.pt")
    code, err = _cli(
        capsys, "--dir", ckpts, "--metrics", "variance", "--no-whole-model", "--output-dir", tmp_path / "o"
    )
    assert code == 0, err
    text = (tmp_path / "o" / "checkpoint_metrics" / "metrics.csv").read_text()
    assert "whole_model" not in text and text.count("variance") == 4
