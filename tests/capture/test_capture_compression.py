"""LoGra and the dense JL projection against the explicit per-sample gradient; storage dtypes.

The explicit per-sample gradient G (B, groups, d_out, d_in) is built from the torch.func reference
(weight and bias as the last input column), never from analog's own uncompressed logs.
"""

import subprocess
import sys

import pytest
import torch
from capture_reference import func_per_sample, make_analog
from torch import nn

from analog.compression.dense import DenseProjector
from analog.compression.logra import LoGraProjector

B = 6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 8, kernel_size=3, padding=1, groups=2)
        self.fc = nn.Linear(8, 10)
        self.head = nn.Linear(10, 3, bias=False)

    def forward(self, idx):
        h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        return self.head(torch.tanh(self.fc(torch.tanh(h))))


def loss_fn(out, y):
    return ((out - y) ** 2).sum()


def explicit_G(model, ref):
    """{module: G (B, groups, d_out, d_in)} from reference parameter gradients."""
    conv = ref["conv.weight"].reshape(B, 2, 4, -1)
    return {
        "emb": ref["emb.weight"].transpose(1, 2)[:, None],
        "conv": torch.cat([conv, ref["conv.bias"].reshape(B, 2, 4, 1)], -1),
        "fc": torch.cat([ref["fc.weight"], ref["fc.bias"][..., None]], -1)[:, None],
        "head": ref["head.weight"][:, None],
    }


def data():
    torch.manual_seed(0)
    model = Net()
    idx = torch.randint(0, 20, (B, 7))
    y = torch.randn(B, 7, 3)
    return model, idx, y, explicit_G(model, func_per_sample(model, loss_fn, (idx,), (y,)))


def log(analog, model, idx, y, mask=None):
    with analog(data_id=list(range(B)), mask=mask):
        loss_fn(model(idx), y).backward()
    model.zero_grad()
    return {name: kinds["grad"] for name, kinds in analog.get_log()[1].items()}


def project(G, projector, name):
    """P_outᵀ · G · P_in per group (an absent side is the identity: rank ≥ dimension)."""
    p_out = projector.tensors.get(f"{name}/out")
    p_in = projector.tensors.get(f"{name}/in")
    if p_out is not None:
        G = torch.einsum("bgoi,gor->bgri", G, p_out)
    if p_in is not None:
        G = torch.einsum("bgoi,gis->bgos", G, p_in)
    return G


def test_logra_equals_projected_explicit_gradient(tmp_path):
    model, idx, y, G = data()
    rank = {"conv": [3, 5], "head": [8, 2], "default": 4}  # head's d_out=3 < 8: left uncompressed
    analog = make_analog(tmp_path, compression={"type": "logra", "rank": rank, "seed": 3})
    analog.watch(model)
    logs = log(analog, model, idx, y)
    expected_shapes = {"emb": (B, 1, 4, 4), "conv": (B, 2, 3, 5), "fc": (B, 1, 4, 4), "head": (B, 1, 3, 2)}
    assert {k: tuple(v.shape) for k, v in logs.items()} == expected_shapes
    assert "head/out" not in analog.projector.tensors and "head/in" in analog.projector.tensors
    for name, g in logs.items():
        torch.testing.assert_close(g, project(G[name], analog.projector, name), atol=1e-5, rtol=1e-4)
    assert len(logs) == 4


def test_logra_projections_are_seeded_per_module(tmp_path):
    model, _, _, _ = data()
    tensors = []
    for project_name, seed in (("a", 0), ("b", 0), ("c", 1)):
        analog = make_analog(tmp_path, project=project_name, compression={"type": "logra", "rank": 4, "seed": seed})
        analog.watch(model)
        tensors.append(analog.projector.tensors)
    same, other = tensors[0], tensors[2]
    assert len(same) == 6  # in and out for 4 modules, less head/out (d_out 3) and conv/out (4 per group)
    assert all(torch.equal(same[k], tensors[1][k]) for k in same)
    assert all(not torch.allclose(same[k], other[k]) for k in same)
    assert not torch.allclose(same["fc/in"][0, :4], same["fc/out"][0, :4])  # sides differ
    # a fresh process builds the same matrices (no dependence on global RNG state or process)
    code = (
        "import torch; torch.manual_seed(123)\n"
        "from analog.compression.logra import LoGraProjector\n"
        "p = LoGraProjector(rank=4, seed=0); p.setup({'fc': (1, 10, 9)})\n"
        "print(repr(p.tensors['fc/in'].flatten()[:5].tolist()), p.fingerprint()['crc32'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = LoGraProjector(rank=4, seed=0)
    here.setup({"fc": (1, 10, 9)})
    assert int(out[-1]) == here.fingerprint()["crc32"]
    assert torch.equal(here.tensors["fc/in"], same["fc/in"])


def test_logra_rank_glob_first_match_wins_and_missing_default_errors():
    p = LoGraProjector(rank={"h.*.attn": 2, "h.*": [3, 5]})
    p.setup({"h.0.attn": (1, 8, 8), "h.0.mlp": (1, 8, 8)})
    assert p.tensors["h.0.attn/in"].shape == (1, 8, 2)
    assert p.tensors["h.0.mlp/out"].shape == (1, 8, 3) and p.tensors["h.0.mlp/in"].shape == (1, 8, 5)
    with pytest.raises(KeyError, match="lm_head"):
        LoGraProjector(rank={"h.*": 2}).setup({"lm_head": (1, 8, 8)})


def test_logra_fit_pca_picks_top_eigenvectors():
    torch.manual_seed(0)
    dims = {"fc": (2, 6, 5)}
    p = LoGraProjector(rank=[2, 3], init="pca")
    p.setup(dims)
    assert p.needs_fit()
    cov, bases = {"fc": {}}, {}
    for side, d in (("out", 6), ("in", 5)):
        q, _ = torch.linalg.qr(torch.randn(2, d, d, dtype=torch.float64))
        eig = torch.stack([torch.randperm(d).double() + 1.0 for _ in range(2)])  # distinct, shuffled
        cov["fc"][side] = (q * eig[:, None, :]) @ q.transpose(1, 2)
        order = eig.argsort(dim=-1, descending=True)
        bases[side] = torch.stack([q[g][:, order[g]] for g in range(2)])
    p.fit_pca(cov)
    assert not p.needs_fit()
    for side, r in (("out", 2), ("in", 3)):
        got = p.tensors[f"fc/{side}"].double()
        assert got.shape == (2, bases[side].shape[1], r)
        # each column is the eigenvector of the next-largest eigenvalue, up to sign
        cos = (got * bases[side][..., :r]).sum(1).abs()
        torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-5, rtol=0)


def test_dense_equals_vec_g_times_r(tmp_path):
    model, idx, y, G = data()
    analog = make_analog(tmp_path, compression={"type": "dense", "rank": 16, "seed": 5})
    analog.watch(model)
    logs = log(analog, model, idx, y)
    for name, g in logs.items():
        R = analog.projector.tensors[f"{name}/dense"]
        assert R.shape == (G[name][0].numel(), 16)
        torch.testing.assert_close(g, G[name].reshape(B, -1) @ R, atol=1e-4, rtol=1e-4)
    assert len(logs) == 4


def test_dense_preserves_inner_products():
    """⟨Rᵀu, Rᵀv⟩ with R_ij ~ N(0, 1/k) is unbiased for ⟨u, v⟩ with variance (⟨u,v⟩² + ‖u‖²‖v‖²)/k
    ≤ σ² = 2‖u‖²‖v‖²/k (Isserlis). The error is a mean of k i.i.d. products of Gaussians, close to normal
    for k = 256: |err| > 3σ has probability ≈ 0.3 % per pair (Chebyshev alone bounds it by 1/9), so we
    allow 5 % of the 1 000 pairs beyond 3σ and none beyond 6σ. A mis-scaled R (say N(0, 1)) fails by far.
    """
    torch.manual_seed(0)
    d, k, n = 600, 256, 45  # 45·44/2 + 45 = 1 035 pairs
    u = torch.randn(n, d) * torch.rand(n, 1) + 0.3 * torch.randn(1, d)  # correlated, various norms
    p = DenseProjector(rank=k, seed=11)
    p.setup({"m": (1, 20, 30)})
    g = p.compress_grad("m", u.reshape(n, 1, 20, 30))
    exact, approx = u @ u.T, g @ g.T
    norms = u.norm(dim=1)
    sigma = norms[:, None] * norms[None, :] * (2 / k) ** 0.5
    iu = torch.triu_indices(n, n)
    z = ((approx - exact) / sigma)[iu[0], iu[1]]
    assert z.numel() == n * (n + 1) // 2
    assert (z.abs() > 3).float().mean() <= 0.05, (z.abs() > 3).float().mean()
    assert z.abs().max() <= 6
    assert z.abs().mean() > 0.05  # it is a random projection, not the identity


@pytest.mark.parametrize("dtype,rel", [("float32", 0.0), ("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_storage_dtype_round_trip(tmp_path, dtype, rel):
    """Stored values equal the float32 logs rounded once to the storage dtype (relative error ≤ ½ ulp)."""
    model, idx, y, _ = data()
    analog = make_analog(tmp_path, save=True, compression={"type": "logra", "rank": 4},
                         storage={"dtype": dtype})
    analog.watch(model)
    ids, logs = [], {}
    for start in range(0, 2 * B, B):
        with analog(data_id=list(range(start, start + B))):
            loss_fn(model(idx), y * (1 + start)).backward()
        model.zero_grad()
        ids += analog.get_log()[0]
        for name, kinds in analog.get_log()[1].items():
            logs.setdefault(name, []).append(kinds["grad"])
    analog.finalize()
    read_ids, read = [], {}
    for batch_ids, batch in analog.build_log_dataloader(batch_size=5):
        read_ids += list(batch_ids)
        for name, kinds in batch.items():
            read.setdefault(name, []).append(kinds["grad"])
    assert read_ids == ids
    assert set(read) == set(logs) and len(read) == 4
    for name in logs:
        want, got = torch.cat(logs[name]), torch.cat(read[name])
        assert got.dtype == getattr(torch, dtype)
        err = (got.float() - want).abs()
        assert (err <= rel * want.abs() + 1e-30).all(), f"{name}: {(err / want.abs()).max()}"
        if rel:
            assert not torch.equal(got.float(), want)  # it was really stored in lower precision
