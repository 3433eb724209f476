"""OV-circuit spectra on the compact form: a head's d_model x d_model circuit has rank head_dim, so its
condition number is that of its head_dim non-zero singular values, not 1e17 rounding noise."""

import numpy as np
import pytest
import torch
from metrics_fixtures import write_safetensors

from analog.checkpoints import Checkpoint, discover_checkpoints
from analog.metrics import LayerData
from analog.metrics.base import LowRankProduct
from analog.metrics.components import ComponentConfig, OVCircuitComponent
from analog.metrics.spectral import ConditionNumberMetric, PERMetric

D, N_HEADS, N_KV, HD = 16, 4, 2, 4


def _component(tmp_path, data_type="weights"):
    g = torch.Generator().manual_seed(0)
    state = {
        "layers.0.attn.o_proj.weight": torch.randn(D, N_HEADS * HD, generator=g),
        "layers.0.attn.v_proj.weight": torch.randn(N_KV * HD, D, generator=g),
    }
    write_safetensors(tmp_path / "step_1.safetensors", state)
    suffixes = (("output_layer", "attn.o_proj"), ("value_layer", "attn.v_proj"))
    comp = OVCircuitComponent(
        ComponentConfig("ov_circuit", data_type, suffixes, None, (("n_heads", N_HEADS), ("n_kv_heads", N_KV)))
    )
    (ref,) = discover_checkpoints(tmp_path)
    return comp, Checkpoint(ref)


def _nonzero_condition(dense, rank):
    """Reference: numpy's full SVD of the dense product, keeping its ``rank`` leading singular values."""
    s = np.linalg.svd(dense.numpy(), compute_uv=False)
    return s[0] / s[rank - 1], s


def test_head_and_combined_condition_numbers_use_the_non_zero_spectrum(tmp_path):
    comp, ckpt = _component(tmp_path)
    factored = comp.extract_data(ckpt, "val")
    dense = comp.extract(ckpt, "val")
    metric = ConditionNumberMetric()
    ranks = {f"layers.0.ov_circuit.weights.heads.{h}": HD for h in range(N_HEADS)}
    ranks["layers.0.ov_circuit.weights"] = N_KV * HD  # grouped-query attention: W_V has n_kv * head_dim rows
    for name, rank in ranks.items():
        expected, full = _nonzero_condition(dense[name], rank)
        assert full[0] / full[-1] > 1e12  # what the dense d_model x d_model SVD reports: rounding noise
        layer = LayerData(name, factored[name])
        assert layer.singular_values.numel() == rank
        assert metric.compute(layer) == pytest.approx(expected, rel=1e-8)
        assert np.allclose(layer.singular_values.numpy(), full[:rank], rtol=1e-10)
        assert PERMetric().compute(layer) <= 1.0
    assert len(ranks) == N_HEADS + 1


def test_compact_spectrum_of_a_wide_inner_dimension_is_the_full_spectrum():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(5, 8, generator=g).double(), torch.randn(8, 6, generator=g).double()
    s = LowRankProduct(left, right).compact_singular_values()
    torch.testing.assert_close(s, torch.linalg.svdvals(left @ right))


def test_ov_activation_and_gradient_spectra_are_compact_too(tmp_path):
    comp, _ = _component(tmp_path)
    g = torch.Generator().manual_seed(2)
    w_o = torch.randn(D, N_HEADS * HD, generator=g).double()
    w_v = torch.randn(N_KV * HD, D, generator=g).double()
    v = torch.randn(40, N_KV * HD, generator=g).double()
    heads, combined = comp._activation_terms(v, w_o, HD, N_HEADS // N_KV)
    for term, rank in [(heads[0], HD), (combined, N_KV * HD)]:
        expected, _ = _nonzero_condition(term.product(), rank)
        assert ConditionNumberMetric().compute(LayerData("a", term)) == pytest.approx(expected, rel=1e-8)
    grads, _ = comp._gradient_terms(w_o, w_v, torch.randn_like(w_o), torch.randn_like(w_v), HD, N_HEADS // N_KV)
    expected, _ = _nonzero_condition(grads[0].product(), 2 * HD)
    assert ConditionNumberMetric().compute(LayerData("g", grads[0])) == pytest.approx(expected, rel=1e-8)
