"""Autocast (CPU, bf16 and fp16) logging against the eager float32 run of the same model and data.

Stated tolerance: per example, ‖g_autocast − g_fp32‖ / ‖g_fp32‖ ≤ 2e-2 (bf16) or 3e-3 (fp16) for the
logged (LoGra and uncompressed) gradients, and the same bound, relative to the largest entry, for the
K-FAC factors and the influence scores. bf16 keeps 8 mantissa bits (unit round-off 2⁻⁸ ≈ 4e-3); the
errors of the autocast matmuls of forward and backward come to about 6e-3 here (fp16, 11 bits: 7e-4).
Whatever the autocast dtype, captured values are float32, the store holds its configured dtype, and
the curvature statistics accumulate in float64.
"""

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.analysis import InfluenceFunction

REL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(24, 6, 16, generator=gen), torch.randint(0, 5, (24, 6), generator=gen)


def _loss(out, y):
    return nn.functional.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _log(tmp_path, project, dtype, compression):
    x, y = _data()
    model = _model()
    # float32 store: the stated tolerances are those of autocast, not of int8 rows (the default for LoGra)
    run = AnaLog(project, {"root_dir": str(tmp_path), "hessian": "kfac", "compression": compression,
                           "storage": {"dtype": "float32"}})
    run.watch(model)
    live = []
    for i in range(0, len(x), 8):
        with run(data_id=list(range(i, i + 8))):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = model(x[i : i + 8])
                if dtype is not None:
                    assert out.dtype == dtype, "the forward really ran in reduced precision"
            _loss(out, y[i : i + 8]).backward()
        model.zero_grad()
        _, logs = run.get_log()
        live.extend(t.dtype for kinds in logs.values() for t in kinds.values())
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    with run(data_id=["q0", "q1"]):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(x[:2] + 0.5)
        _loss(out, y[:2]).backward()
    scores = run.influence.compute_influence_all(run.get_log(), progress=False).scores
    return run, live, scores


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("compression", [{"type": "logra", "rank": 8}, {"type": "none"}], ids=["logra", "none"])
def test_autocast_logs_match_float32(tmp_path, dtype, compression):
    ref, _, ref_scores = _log(tmp_path, "fp32", None, compression)
    run, live, scores = _log(tmp_path, "amp", dtype, compression)
    assert set(live) == {torch.float32}, "captured logs are float32 under autocast"

    a, b = run.open_store(), ref.open_store()
    assert a.torch_dtype == torch.float32 and a.ids == b.ids
    worst = max(_rel(a.rows(i, i + 1), b.rows(i, i + 1)) for i in range(len(a)))
    assert worst <= REL[dtype], f"per-example relative error {worst:.2e} > {REL[dtype]}"
    if dtype == torch.bfloat16:
        assert worst > 1e-5, "bf16 autocast was in effect (the logs are not bit-identical to float32)"

    for key, value in run.curvature.state.items():
        assert value.dtype == torch.float64, f"K-FAC {key} accumulates in float64"
        ref_value = ref.curvature.state[key]
        if key.rsplit("/", 1)[1] in ("A", "S"):
            assert float((value - ref_value).abs().max() / ref_value.abs().max()) <= REL[dtype], key

    assert float((scores - ref_scores).abs().max() / ref_scores.abs().max()) <= REL[dtype]
