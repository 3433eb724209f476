"""OV circuits of real Hugging Face checkpoints (``save_pretrained`` folders of tiny models built from
their configs): head counts read from ``config.json`` under the names models use, and a fused QKV
projection refused instead of measured.

Reference: the combined circuit ``sum_h W_O[:, h] W_V[g(h)]`` built head by head with numpy.
"""

import json
import shutil

import numpy as np
import pytest
import yaml

from analog.cli import main

transformers = pytest.importorskip("transformers")


def _config(tmp_path, value_layer, output_layer, metric="norm"):
    cfg = {
        "analysis_name": "ov",
        "metrics": [
            {
                "metric_name": metric,
                "components": [
                    {
                        "component_name": "ov_circuit",
                        "data_type": "weights",
                        "heads": "combined",
                        "layer_suffixes": {"output_layer": output_layer, "value_layer": value_layer},
                    }
                ],
            }
        ],
        "monitoring": {"output_dir": str(tmp_path / "out")},
    }
    path = tmp_path / "analysis.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(tmp_path):
    lines = (tmp_path / "out" / "ov" / "metrics.csv").read_text().splitlines()[1:]
    return {(int(r.split(",")[0]), r.split(",")[3]): float(r.split(",")[4]) for r in lines}


def _llama_run(root, seeds=(0, 1)):
    import torch

    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    models = {}
    for step, seed in zip((100, 200), seeds):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(root / f"checkpoint-{step}")
        models[step] = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    return models


def _combined_ov(w_o, w_v, n_heads=4, n_kv=2):
    head_dim = w_o.shape[1] // n_heads
    total = np.zeros((w_o.shape[0], w_v.shape[1]))
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        total += w_o[:, h * head_dim : (h + 1) * head_dim] @ w_v[g * head_dim : (g + 1) * head_dim]
    return total


@pytest.mark.parametrize("heads_keys", [None, {"n_head": 4, "num_kv_heads": 2}])
def test_llama_head_counts_come_from_config_json(tmp_path, heads_keys):
    run = tmp_path / "run"
    models = _llama_run(run)
    if heads_keys is not None:  # the names GPT-2/BLOOM (n_head) and Falcon (num_kv_heads) use
        for folder in run.iterdir():
            cfg = json.loads((folder / "config.json").read_text())
            cfg.pop("num_attention_heads")
            cfg.pop("num_key_value_heads")
            (folder / "config.json").write_text(json.dumps({**cfg, **heads_keys}))
    assert main(["metrics", "--config", str(_config(tmp_path, "self_attn.v_proj", "self_attn.o_proj")),
                 "--run-path", str(run), "--quiet"]) == 0
    rows = _rows(tmp_path)
    compared = 0
    for step, weights in models.items():
        for layer in range(2):
            stem = f"model.layers.{layer}.self_attn"
            ov = _combined_ov(weights[f"{stem}.o_proj.weight"], weights[f"{stem}.v_proj.weight"])
            got = rows[(step, f"model.layers.{layer}.ov_circuit.weights")]
            assert got == pytest.approx(np.linalg.norm(ov), rel=1e-10)
            compared += 1
    assert compared == 4


def test_gpt2_fused_qkv_is_refused_naming_the_step(tmp_path, capsys):
    import torch

    run = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(run / "checkpoint-100")
    shutil.copytree(run / "checkpoint-100", run / "checkpoint-200")
    code = main(["metrics", "--config", str(_config(tmp_path, "attn.c_attn", "attn.c_proj", "condition_number")),
                 "--run-path", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0, "a (32, 96) fused c_attn was measured as a value projection"
    assert "W_V (32, 96) reads 96 features but W_O (32, 32) writes 32" in err
    assert "step 100" in err and "fused QKV" in err
    assert not (tmp_path / "out" / "ov" / "metrics.csv").exists()
