"""ParameterChangeMetrics and SparseQualityMetrics against independent computations."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from analog.monitor import (
    AnalysisContext,
    ParameterChangeMetrics,
    ParameterDelta,
    ParameterSnapshot,
    SparseQualityMetrics,
    format_threshold,
)
from analog.monitor.parameter_change import component_names, layer_index


class TinyLM(nn.Module):
    """Embedding -> two blocks (q_proj, gate_proj) -> head, output logits (B, T, V)."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(dim, dim), "gate_proj": nn.Linear(dim, dim)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.layers:
            h = h + torch.tanh(block["q_proj"](h)) * torch.sigmoid(block["gate_proj"](h))
        return self.lm_head(h)


def _changed(model, seed=3, scale=3e-2):
    """(old snapshot, delta) after a random change of about half the entries of ``model``."""
    old = ParameterSnapshot.capture(model, step=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            param.add_(noise * (torch.rand(param.shape, generator=generator) > 0.5))
    return old, ParameterDelta.between(old, ParameterSnapshot.capture(model, step=1))


def _flat_delta(model, old):
    return {n: (p.detach().double() - old[n].double()).numpy().ravel() for n, p in model.named_parameters()}


def test_threshold_names():
    assert [format_threshold(t) for t in (1e-8, 1e-6, 1e-4, 0, 2.5e-5)] == ["1e-08", "1e-06", "1e-04", "0", "2.5e-05"]


def test_parameter_change_values():
    torch.manual_seed(0)
    model = TinyLM()
    old, delta = _changed(model)
    flats = _flat_delta(model, old)
    flat = np.concatenate(list(flats.values()))
    metrics = ParameterChangeMetrics([1e-3, 1e-2], per_layer=True, track_components=True).compute(delta=delta)
    assert metrics["param_change/norm_l2"] == pytest.approx(np.sqrt((flat**2).sum()), rel=1e-5)
    assert metrics["param_change/norm_l1"] == pytest.approx(np.abs(flat).sum(), rel=1e-5)
    assert metrics["param_change/norm_max"] == pytest.approx(np.abs(flat).max(), rel=1e-5)
    assert metrics["param_change/std"] == pytest.approx(flat.std(ddof=1), rel=1e-4)
    for threshold, label in ((1e-3, "1e-03"), (1e-2, "1e-02")):
        expected = (np.abs(flat) <= threshold).mean()
        assert metrics[f"param_change/sparsity_at_{label}"] == pytest.approx(expected, abs=1e-6)
        assert metrics[f"param_change/changed_ratio_at_{label}"] == pytest.approx(1 - expected, abs=1e-6)
    layer1 = np.concatenate([v for n, v in flats.items() if n.startswith("layers.1.")])
    assert metrics["param_change/layer_1/mean_abs_delta"] == pytest.approx(np.abs(layer1).mean(), rel=1e-5)
    assert metrics["param_change/layer_1/sparsity"] == pytest.approx((np.abs(layer1) <= 1e-3).mean())
    gate = np.concatenate([v for n, v in flats.items() if ".gate_proj." in n])
    assert metrics["param_change/component/gate_proj/mean_abs_delta"] == pytest.approx(np.abs(gate).mean(), rel=1e-5)
    assert metrics["param_change/component/gate_proj/numel"] == gate.size == 2 * (64 + 8)
    layer_keys = sorted(k for k in metrics if "/layer_" in k and k.endswith("mean_abs_delta"))
    assert layer_keys == ["param_change/layer_0/mean_abs_delta", "param_change/layer_1/mean_abs_delta"]


def test_component_and_layer_names():
    names = [
        "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "lm_head.weight",
    ]
    components = component_names(names)
    assert [components[n] for n in names] == ["wte", "c_attn", "attn.c_proj", "mlp.c_proj", "q_proj", "lm_head"]
    assert [layer_index(n) for n in names] == [None, 0, 0, 0, 3, None]


def _sparse_logits_direct(model, old, inputs, threshold):
    """Logits of a copy of ``model`` with W = W_old + Δ·1[|Δ| > t], built with numpy."""
    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in sparse.named_parameters():
            new, base = param.detach().numpy(), old[name].numpy()
            param.copy_(torch.from_numpy(np.where(np.abs(new - base) > threshold, new, base)))
    return sparse(inputs).detach().double().numpy()


def _compare_direct(full, sparse):
    """kl(p_full || p_sparse), cosine, mse, top-1 agreement averaged over positions (float64)."""
    full, sparse = full.reshape(-1, full.shape[-1]), sparse.reshape(-1, sparse.shape[-1])

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(full), log_softmax(sparse)
    cos = (full * sparse).sum(-1) / (np.linalg.norm(full, axis=-1) * np.linalg.norm(sparse, axis=-1))
    return {
        "kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
        "cosine": float(cos.mean()),
        "mse": float(((full - sparse) ** 2).mean()),
        "top1_agree": float((full.argmax(-1) == sparse.argmax(-1)).mean()),
    }


def test_sparse_quality_matches_direct_computation_and_restores_weights():
    torch.manual_seed(1)
    model = TinyLM().eval()
    old, delta = _changed(model)
    inputs = torch.randint(0, 11, (3, 7))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = model(inputs).detach().double().numpy()
    thresholds = [0.0, 1e-2, 4e-2]
    metrics = SparseQualityMetrics(thresholds, include_random=True).compute(
        delta=delta, snapshot=old, context=AnalysisContext(model=model, inputs=inputs)
    )
    compared = 0
    for threshold in thresholds:
        label = format_threshold(threshold)
        expected = _compare_direct(full, _sparse_logits_direct(model, old, inputs, threshold))
        for key, value in expected.items():
            assert metrics[f"sparse/{key}_at_{label}"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            compared += 1
        kept = np.mean(np.concatenate([np.abs(v) > threshold for v in _flat_delta(model, old).values()]))
        assert metrics[f"sparse/kept_ratio_at_{label}"] == pytest.approx(kept)
        assert metrics[f"sparse/unchanged_ratio_at_{label}"] == pytest.approx(1 - kept)
        assert metrics[f"sparse/kept_ratio_at_{label}_random"] == metrics[f"sparse/kept_ratio_at_{label}"]
        assert f"sparse/kl_at_{label}_random" in metrics
    assert compared == 12
    assert metrics["sparse/kl_at_0"] == 0.0 and metrics["sparse/top1_agree_at_0"] == 1.0
    assert metrics["sparse/mse_at_0"] == 0.0
    assert metrics["sparse/kl_at_4e-02"] > 0.0
    assert len(before) == 11
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_sparse_quality_on_hugging_face_model_with_tied_weights():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.train()
    old, delta = _changed(model, scale=1e-2)
    inputs = {
        "input_ids": torch.randint(0, 64, (2, 8)),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
        "labels": torch.randint(0, 64, (2, 8)),
    }
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = SparseQualityMetrics([0.0, 1e-2]).compute(
        delta=delta, snapshot=old, context=AnalysisContext(model=model, inputs=inputs)
    )
    assert metrics["sparse/kl_at_0"] == 0.0 and metrics["sparse/top1_agree_at_0"] == 1.0
    assert metrics["sparse/cosine_at_0"] == pytest.approx(1.0)
    assert 0.0 < metrics["sparse/kl_at_1e-02"] and metrics["sparse/kept_ratio_at_1e-02"] < 1.0
    assert model.training, "train mode restored"
    state_after = model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(state_before) == len(state_after) > 20
    for key, value in state_before.items():
        assert torch.equal(value, state_after[key]), key


def test_sparse_quality_without_inputs_reports_nothing():
    model = TinyLM()
    old, delta = _changed(model)
    assert SparseQualityMetrics().compute(delta=delta, snapshot=old, context=AnalysisContext(model=model)) == {}


def test_random_mask_keeps_the_same_fraction():
    from analog.monitor.sparse_quality import EXACT_RANDOM_MAX, _random_like

    generator = torch.Generator().manual_seed(0)
    small = torch.rand(1000, generator=generator) > 0.7
    assert int(_random_like(small, generator).sum()) == int(small.sum())
    large = torch.rand(EXACT_RANDOM_MAX + 1000, generator=generator) > 0.7
    fraction = _random_like(large, generator).float().mean().item()
    assert fraction == pytest.approx(large.float().mean().item(), abs=3e-3)
    assert not torch.equal(_random_like(large, generator), large)
