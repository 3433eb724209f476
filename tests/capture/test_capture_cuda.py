"""The same checks on a CUDA device (skipped where there is none, as in CI).

* per-sample gradients of a tiny GPT-2 logged on the GPU equal ``torch.func`` per-sample gradients
  computed on the GPU (uncompressed, padded batch, tied embeddings);
* LoGra-compressed logs written from the GPU and fitted with K-FAC: every training example queried
  against the store ranks itself first, and the scores equal the CPU run of the same model and data.
"""

import pytest
import torch
from capture_reference import analog_per_sample, assert_grads_match, func_per_sample, make_analog
from test_capture_hf import LM, lm_loss

from analog import AnaLog
from analog.analysis import InfluenceFunction

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, T, V = 4, 9, 64


def gpt2(device):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return LM(transformers.GPT2LMHeadModel(config).eval()).to(device)


def batch(device):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return ids.to(device), mask.to(device)


def test_gpt2_per_sample_gradients_on_cuda(tmp_path):
    model = gpt2("cuda")
    ids, mask = batch("cuda")
    analog = make_analog(tmp_path)
    analog.watch(model)
    got = analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    assert all(g.device.type == "cuda" for g in got.values())
    ref = func_per_sample(model, lm_loss, (ids, mask), (ids, mask), tie_weights=False)
    # per block: 4 Conv1D and 2 LayerNorm (weight and bias each); then wte, wpe, ln_f (2) and lm_head
    assert assert_grads_match(got, ref, atol=1e-4, rtol=1e-3) == 2 * (4 * 2 + 2 * 2) + 5


def _scores(tmp_path, device):
    model = gpt2(device)
    # float32 store: GPU and CPU rows are compared to 1e-3; int8 rounding of nearly equal values could
    # fall on either side of a step (GPU int8 stores: test_storage_int8.py)
    run = AnaLog("cuda_flow", {"root_dir": str(tmp_path / device), "hessian": "kfac",
                               "compression": {"type": "logra", "rank": 8}, "storage": {"dtype": "float32"}})
    run.watch(model, name_filter=["m.transformer.h.*"])
    gen = torch.Generator().manual_seed(2)
    data = [torch.randint(0, V, (B, T), generator=gen) for _ in range(6)]
    full = torch.ones(B, T, dtype=torch.long, device=device)
    for i, ids in enumerate(data):
        ids = ids.to(device)
        with run(data_id=list(range(i * B, (i + 1) * B))):
            lm_loss(model(ids, full), ids, full).backward()
        model.zero_grad()
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    ids = data[2].to(device)
    with run():
        lm_loss(model(ids, full), ids, full).backward()
    return run.influence.compute_influence_all(run.get_log(), run.build_log_dataloader())


def test_logra_kfac_flow_on_cuda_matches_cpu(tmp_path):
    gpu, cpu = _scores(tmp_path, "cuda"), _scores(tmp_path, "cpu")
    s_gpu, s_cpu = torch.as_tensor(gpu.scores).cpu().double(), torch.as_tensor(cpu.scores).cpu().double()
    assert s_gpu.shape == (B, 6 * B)
    assert list(gpu.train_ids) == list(cpu.train_ids) and len(gpu.train_ids) == 6 * B
    # the queried batch is training batch 2: each query ranks its own training example first
    own = [gpu.train_ids.index(2 * B + q) for q in range(B)]
    assert s_gpu.argmax(1).tolist() == own
    rel = (s_gpu - s_cpu).norm() / s_cpu.norm()
    assert rel < 1e-3, f"GPU and CPU scores differ by {rel:.2e} (relative)"
