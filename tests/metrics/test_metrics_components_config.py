"""Components (simple, ov_circuit) and config validation."""

import pytest
import torch
from metrics_fixtures import write_safetensors

from analog.checkpoints import Checkpoint, discover_checkpoints
from analog.metrics import ConfigError, parse_config
from analog.metrics.components import ComponentConfig, OVCircuitComponent, SimpleComponent

D, N_HEADS, N_KV, HD = 8, 4, 2, 2


def _attention_checkpoint(tmp_path, layers=2):
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"model.layers.{i}.attn.o_proj.weight"] = torch.randn(D, N_HEADS * HD, generator=g)
        state[f"model.layers.{i}.attn.v_proj.weight"] = torch.randn(N_KV * HD, D, generator=g)
    write_safetensors(tmp_path / "step_1.safetensors", state)
    (ref,) = discover_checkpoints(tmp_path)
    return Checkpoint(ref), state


def test_simple_component_selects_by_suffix_and_layer(tmp_path):
    ckpt, state = _attention_checkpoint(tmp_path)
    comp = SimpleComponent(ComponentConfig("simple", "weights", "attn.o_proj", (1,)))
    out = comp.extract(ckpt, "val")
    assert list(out) == ["model.layers.1.attn.o_proj.weights"]
    assert torch.equal(out["model.layers.1.attn.o_proj.weights"], state["model.layers.1.attn.o_proj.weight"])


def test_suffix_selects_every_layer_of_keys_without_a_prefix(tmp_path):
    """nn.Sequential state dicts (``0.weight``, ``2.weight``): the leading integer is the layer index."""
    state = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4), "2.weight": torch.randn(2, 4),
             "2.bias": torch.randn(2)}
    write_safetensors(tmp_path / "step_1.safetensors", state)
    ckpt = Checkpoint(discover_checkpoints(tmp_path)[0])
    out = SimpleComponent(ComponentConfig("simple", "weights", "weight")).extract(ckpt, "val")
    assert sorted(out) == ["0.weights", "2.weights"]
    assert torch.equal(out["0.weights"], state["0.weight"]) and torch.equal(out["2.weights"], state["2.weight"])
    only = SimpleComponent(ComponentConfig("simple", "weights", "weight", (2,))).extract(ckpt, "val")
    assert list(only) == ["2.weights"]


def test_suffix_matching_nothing_and_missing_layer_are_errors_naming_them(tmp_path):
    ckpt, _ = _attention_checkpoint(tmp_path)
    with pytest.raises(KeyError, match="layer suffix 'mlp.up' matches no tensor in the weights of step 1"):
        SimpleComponent(ComponentConfig("simple", "weights", "mlp.up")).extract(ckpt, "val")
    with pytest.raises(KeyError, match=r"layer\(s\) \[5\] with suffix 'attn.v_proj'"):
        SimpleComponent(ComponentConfig("simple", "weights", "attn.v_proj", (0, 5))).extract(ckpt, "val")


def test_ov_circuit_is_gqa_aware_and_matches_a_per_head_loop(tmp_path):
    ckpt, state = _attention_checkpoint(tmp_path)
    suffixes = (("output_layer", "attn.o_proj"), ("value_layer", "attn.v_proj"))
    options = (("n_heads", N_HEADS), ("n_kv_heads", N_KV))
    out = OVCircuitComponent(ComponentConfig("ov_circuit", "weights", suffixes, (0, 1), options)).extract(ckpt, "val")
    compared = 0
    for layer in (0, 1):
        w_o = state[f"model.layers.{layer}.attn.o_proj.weight"].double()
        w_v = state[f"model.layers.{layer}.attn.v_proj.weight"].double()
        w_v_full = w_v.reshape(N_KV, HD, D).repeat_interleave(N_HEADS // N_KV, 0).reshape(N_HEADS * HD, D)
        for h in range(N_HEADS):
            kv = h // (N_HEADS // N_KV)
            expected = w_o[:, h * HD : (h + 1) * HD] @ w_v[kv * HD : (kv + 1) * HD]
            got = out[f"model.layers.{layer}.ov_circuit.weights.heads.{h}"]
            assert got.shape == (D, D)
            torch.testing.assert_close(got, expected)
            compared += 1
        torch.testing.assert_close(out[f"model.layers.{layer}.ov_circuit.weights"], w_o @ w_v_full)
    assert compared == 2 * N_HEADS


def test_ov_activation_orientation_matches_weights(tmp_path):
    ckpt, state = _attention_checkpoint(tmp_path)
    comp = OVCircuitComponent(
        ComponentConfig(
            "ov_circuit",
            "weights",
            (("output_layer", "attn.o_proj"), ("value_layer", "attn.v_proj")),
            (0,),
            (("n_heads", N_HEADS), ("n_kv_heads", N_KV)),
        )
    )
    ov = comp.extract(ckpt, "val")
    x = torch.randn(5, D, dtype=torch.float64)
    v = x @ state["model.layers.0.attn.v_proj.weight"].double().T
    acts, combined = comp._activation_terms(v, state["model.layers.0.attn.o_proj.weight"].double(), HD, N_HEADS // N_KV)
    for h in range(N_HEADS):
        torch.testing.assert_close(acts[h].product(), x @ ov[f"model.layers.0.ov_circuit.weights.heads.{h}"].T)
    torch.testing.assert_close(combined.product(), x @ ov["model.layers.0.ov_circuit.weights"].T)


def _base(**entry):
    return {"analysis_name": "a", "metrics": [{"metric_name": "norm", **entry}]}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**_base(), "colour": 1}, "config: unknown key.*colour"),
        (_base(norm_type="L7"), r"metrics\[0\].*norm_type"),
        (_base(components=[{"data_type": "weight"}]), r"metrics\[0\].components\[0\].*data_type 'weight'"),
        (_base(components=[{"layer_suffixes": "x", "layer": [1]}]), r"components\[0\]: unknown key.*layer\b"),
        (_base(components=[{"layer_suffixes": "x", "layers": ["a"]}]), r"layers\[0\]: expected an integer"),
        ({"analysis_name": "a", "metrics": [{"metric_name": "cka"}]}, "needs target_checkpoint"),
        ({"analysis_name": "a", "metrics": [{"metric_name": "nope"}]}, "unknown metric 'nope'"),
        ({**_base(), "steps": {"start": 0, "end": 10, "stride": 2}}, "steps: unknown key.*stride"),
        ({**_base(), "monitoring": {"save_to_wandb": "yes"}}, "save_to_wandb"),
        ({**_base(), "metrics": [{"metric_name": "gini"}, {"metric_name": "gini"}]}, "identical"),
    ],
)
def test_invalid_configs_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_same_metric_with_different_settings_gets_distinct_labels():
    config = parse_config(
        {
            "analysis_name": "a",
            "steps": {"start": 0, "end": 100, "step": 50},
            "metrics": [
                {"metric_name": "norm", "norm_type": "frobenius"},
                {"metric_name": "norm", "norm_type": "spectral"},
                {"metric_name": "cka", "target_checkpoint": 100, "data_split": "val"},
                {"metric_name": "cka", "target_checkpoint": 100, "data_split": "train"},
            ],
        }
    )
    labels = [m.label for m in config.metrics]
    assert labels == [
        "norm__norm_type=frobenius",
        "norm__norm_type=spectral",
        "cka__data_split=val",
        "cka__data_split=train",
    ]
    assert config.steps == (0, 50, 100)


def test_ov_gradient_is_the_directional_derivative_of_the_weight_circuit():
    comp = OVCircuitComponent(
        ComponentConfig(
            "ov_circuit",
            "gradients",
            (("output_layer", "o"), ("value_layer", "v")),
            None,
            (("n_heads", N_HEADS), ("n_kv_heads", N_KV)),
        )
    )
    g = torch.Generator().manual_seed(1)
    w_o, w_v = torch.randn(D, N_HEADS * HD, generator=g).double(), torch.randn(N_KV * HD, D, generator=g).double()
    g_o, g_v = torch.randn_like(w_o), torch.randn_like(w_v)
    eps = 1e-6
    grads, grad_all = comp._gradient_terms(w_o, w_v, g_o, g_v, HD, N_HEADS // N_KV)
    plus, plus_all = comp._weight_terms(w_o + eps * g_o, w_v + eps * g_v, HD, N_HEADS // N_KV)
    base, base_all = comp._weight_terms(w_o, w_v, HD, N_HEADS // N_KV)
    assert len(grads) == N_HEADS
    for h in range(N_HEADS):
        torch.testing.assert_close(
            grads[h].product(), (plus[h].product() - base[h].product()) / eps, rtol=1e-4, atol=1e-4
        )
    derivative = (plus_all.product() - base_all.product()) / eps
    torch.testing.assert_close(grad_all.product(), derivative, rtol=1e-4, atol=1e-4)
