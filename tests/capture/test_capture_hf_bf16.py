"""A Hugging Face model whose weights are bfloat16 (``model.to(torch.bfloat16)``, no autocast).

Captured factors are float32 whatever the model's dtype; the embedding rule built its one-hot activations in
the weight's dtype, so with uncompressed logs (``compression: none``, where the one-hot is not gathered
through a float32 projection) the first backward raised "expected m1 and m2 to have the same dtype".

Reference: the batch-size-1 autograd loop on the same bf16 model (its ``param.grad`` is bf16, summed by
autograd in bf16): per example ‖g_analog − g_loop‖ / ‖g_loop‖ ≤ 2e-2 (bf16's unit round-off is 4e-3; analog
forms δ aᵀ in float32 from the same bf16 δ and a).
"""

import pytest
import torch
import torch.nn.functional as F
from capture_reference import analog_per_sample, loop_per_sample, make_analog

tf = pytest.importorskip("transformers")

B, T, V = 3, 6, 40


def loss(logits, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


class LM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("compression", ["none", "logra"])
def test_bf16_weights_log_like_the_bf16_loop(tmp_path, compression):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    model = LM(tf.LlamaForCausalLM(config).eval().to(torch.bfloat16))
    ids = torch.randint(1, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    ids = ids * mask
    if compression == "logra":  # the path that already worked: the rows reach the store finite, in float32
        run = make_analog(tmp_path, compression={"type": "logra", "rank": 4})
        run.watch(model)
        with run(data_id=list(range(B)), mask=mask):
            loss(model(ids, mask), ids, mask).backward()
        _, logs = run.get_log()
        assert len(logs) == 1 + 1 + 7 + 3  # embed, lm_head, q k v o gate up down, three norms (final norm too)
        assert all(kinds["grad"].dtype == torch.float32 and torch.isfinite(kinds["grad"]).all()
                   for kinds in logs.values())
        return
    run = make_analog(tmp_path)
    run.watch(model)
    got = analog_per_sample(run, lambda: loss(model(ids, mask), ids, mask), B, mask=mask)
    ref = loop_per_sample(model, loss, (ids, mask), (ids, mask))
    assert set(got) == set(ref)
    for key, g in got.items():
        assert g.dtype == torch.float32, key
        r = ref[key].float()
        err = (g - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-12)
        assert err.max() <= 2e-2, (key, err)
    assert len(got) == len(dict(model.named_parameters())) == 12
