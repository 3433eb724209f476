"""End to end through the ``analog`` command: config and quick forms, outputs, planted jump, bad input."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
import yaml
from metrics_fixtures import tiny_state, write_model_file, write_pico_step

from analog.cli import main

STEPS = [0, 100, 200, 300, 400, 500, 700, 1000]
JUMP = 500


@pytest.fixture(scope="module")
def pico_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for step in STEPS:
        folder = write_pico_step(run, step, seed=step)
        if step >= JUMP:  # planted jump: weights triple from step 500 on
            weights = torch.load(folder / "val_weights.pt")
            torch.save({k: v * 3 for k, v in weights.items()}, folder / "val_weights.pt")
    return run


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_config_form_writes_every_output(pico_run, tmp_path):
    config = {
        "analysis_name": "demo",
        "steps": STEPS,
        "metrics": [
            {
                "metric_name": "norm",
                "norm_type": "frobenius",
                "components": [{"data_type": "weights", "layer_suffixes": "mlp", "layers": [0, 1]}],
            },
            {
                "metric_name": "norm",
                "norm_type": "spectral",
                "components": [{"data_type": "weights", "layer_suffixes": "mlp"}],
            },
            {
                "metric_name": "per",
                "components": [{"data_type": "gradients", "layer_suffixes": "mlp"}],
                "aggregation": "mean",
            },
            {
                "metric_name": "cka",
                "target_checkpoint": 1000,
                "components": [{"data_type": "activations", "layer_suffixes": "mlp"}],
            },
            {
                "metric_name": "pwcca",
                "target_checkpoint": 1000,
                "components": [{"data_type": "activations", "layer_suffixes": "mlp"}],
            },
        ],
        "monitoring": {"output_dir": str(tmp_path / "out")},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["metrics", "--config", str(cfg_path), "--run-path", str(pico_run), "--quiet"]) == 0
    out = tmp_path / "out" / "demo"
    labels = ["norm__norm_type=frobenius", "norm__norm_type=spectral", "per", "cka", "pwcca"]
    for step in STEPS:
        for label in labels:
            assert (out / f"step_{step}" / f"{label}_val.json").is_file()
    rows = _read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["step", "metric", "component", "layer", "value"]
    assert len(rows) == len(STEPS) * ((2 + 1) + (2 + 1) + (3 + 1) + 2 + 2)  # +1: whole-model values
    weights = torch.load(pico_run / "checkpoints" / "step_300" / "learning_dynamics" / "val_weights.pt")
    row = next(
        r
        for r in rows
        if r["metric"] == "norm__norm_type=spectral" and r["step"] == "300" and r["layer"] == "model.1.mlp.weights"
    )
    assert float(row["value"]) == pytest.approx(np.linalg.norm(weights["model.1.mlp"].numpy(), 2), rel=1e-6)
    cka_last = [float(r["value"]) for r in rows if r["metric"] == "cka" and r["step"] == "1000"]
    assert cka_last == pytest.approx([1.0, 1.0])
    step_json = json.loads((out / "step_300" / "norm__norm_type=frobenius_val.json").read_text())
    assert sorted(step_json) == ["model.0.mlp.weights", "model.1.mlp.weights", "whole_model.simple:weights"]
    both = np.concatenate([weights[k].numpy().ravel() for k in ("model.0.mlp", "model.1.mlp")])
    assert step_json["whole_model.simple:weights"] == pytest.approx(np.sqrt(np.sum(both**2)), rel=1e-12)
    transitions = json.loads((out / "transitions.json").read_text())["transitions"]
    flagged = {(t["rule"], t["layer"], t["step"]) for t in transitions if t["metric"] == "norm__norm_type=frobenius"}
    layers = ("model.0.mlp.weights", "model.1.mlp.weights", "whole_model.simple:weights")
    assert flagged == {("changepoint", layer, JUMP) for layer in layers}  # the default rule: the jump, nothing else
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_quick_form_with_custom_and_model_metrics(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step in (10, 2, 30):
        torch.save({"model_state_dict": tiny_state(step)}, ckpts / f"epoch_{step}.pt")
    model_file = write_model_file(tmp_path)
    custom = tmp_path / "custom.py"
    custom.write_text("def n_params_of_model(model):\n    return float(sum(p.numel() for p in model.parameters()))\n")
    args = [
        "metrics",
        "--dir",
        str(ckpts),
        "--metrics",
        "spectral,entropy,stable_rank",
        "--custom-metrics",
        str(custom),
        "--model",
        str(model_file),
        "--class-name",
        "TinyNet",
        "--output-dir",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(args) == 0
    rows = _read_csv(tmp_path / "out" / "checkpoint_metrics" / "metrics.csv")
    assert sorted({r["step"] for r in rows}, key=int) == ["2", "10", "30"]
    assert {r["value"] for r in rows if r["metric"] == "n_params_of_model"} == {str(float(5 * 6 + 5 + 3 * 5 + 3))}
    spectral_layers = {r["layer"] for r in rows if r["metric"] == "spectral"}
    # 1-D biases skipped when no layer is named; the whole-model value is the largest singular value
    assert spectral_layers == {"fc1.weights", "fc2.weights", "whole_model.simple:weights"}
    assert len({r["layer"] for r in rows if r["metric"] == "entropy"}) == 4 + 1
    assert "wandb" not in sys.modules


def _cli_error(capsys, args):
    assert main(["metrics", "--quiet", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_gives_one_clear_error(tmp_path, capsys, pico_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoints found in" in _cli_error(capsys, ["--dir", str(empty), "--metrics", "gini"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "step_4.pt").write_bytes(b"PK\x03\x04 truncated")
    assert "step_4.pt: corrupt or truncated" in _cli_error(capsys, ["--dir", str(bad), "--metrics", "gini"])
    err = _cli_error(capsys, ["--dir", str(pico_run), "--metrics", "gini", "--layer-suffixes", "attn.q"])
    assert "layer suffix 'attn.q' matches no tensor" in err and "step 0" in err
    assert "step(s) [7, 9] not found" in _cli_error(
        capsys, ["--dir", str(pico_run), "--metrics", "gini", "--steps", "7,9"]
    )  # no listed step on disk at all: an error
    err = _cli_error(capsys, ["--dir", str(pico_run), "--metrics", "gini", "--relative-threshold", "-1"])
    assert "transitions.relative_threshold" in err
    err = _cli_error(capsys, ["--dir", str(pico_run), "--metrics", "nope"])
    assert "unknown metric 'nope'" in err
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    state = tiny_state(0)
    state["extra.weight"] = state.pop("fc2.bias")
    torch.save(state, mismatched / "step_3.pt")
    model_file = write_model_file(tmp_path)
    err = _cli_error(
        capsys,
        [
            "--dir",
            str(mismatched),
            "--metrics",
            "gini",
            "--custom-metrics",
            str(_custom(tmp_path)),
            "--model",
            str(model_file),
        ],
    )
    assert "step 3" in err and "missing keys: fc2.bias" in err and "unexpected keys: extra.weight" in err


def _custom(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("def zero_of_model(model):\n    return 0.0\n")
    return path


def test_quick_form_comparative_metric_skips_vectors_like_the_spectral_ones(tmp_path):
    """`--metrics cka --target-step N` on every tensor: biases have no CKA and are left out on both sides."""
    g = torch.Generator().manual_seed(0)
    states = {s: {"0.weight": torch.randn(6, 3, generator=g), "0.bias": torch.randn(6, generator=g),
                  "2.weight": torch.randn(6, 6, generator=g), "2.bias": torch.randn(6, generator=g)} for s in (1, 2)}
    for s, state in states.items():
        torch.save(state, tmp_path / f"step_{s}.pt")
    out = tmp_path / "out"
    assert main(["metrics", "--dir", str(tmp_path), "--metrics", "cka", "--target-step", "2", "--output-dir", str(out),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "checkpoint_metrics" / "metrics.csv")))
    assert sorted((r["step"], r["layer"]) for r in rows) == [("1", "0.weights"), ("1", "2.weights"),
                                                             ("2", "0.weights"), ("2", "2.weights")]

    def cka(x, y):  # linear CKA of column-centred (samples = output units) matrices
        x, y = (m.double() - m.double().mean(0) for m in (x, y))
        return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))

    for r in rows:
        key = r["layer"].replace(".weights", ".weight")
        assert float(r["value"]) == pytest.approx(cka(states[int(r["step"])][key], states[2][key]), rel=1e-9)
