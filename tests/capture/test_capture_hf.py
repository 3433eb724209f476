"""Hugging Face GPT-2 and BERT (tiny configs, random init, no download) with padding and attention masks.

What is watched and why:

* position embeddings (GPT-2 ``wpe``, BERT ``position_embeddings``) are *not* watched: their input is
  ``position_ids`` of shape (1, T), shared by the whole batch, so their output gradient is already summed
  over examples before any hook sees it — no per-sample gradient can be recovered from it. Watching one
  is a clear batch-size error (tested below).
* GPT-2's ``lm_head`` is tied to ``wte``: both modules are watched and each logs *its own use* of the
  shared matrix. The reference separates the two uses with ``functional_call(..., tie_weights=False)``;
  the gradient of the tied parameter is their sum (lm_head's G plus wte's transposed), also checked.

Padding is on the right and the loss ignores padded positions, so with ``mask=attention_mask`` the
logged gradients equal the exact per-example gradients of that loss.
"""

import pytest
import torch
from capture_reference import (
    analog_per_sample,
    assert_grads_match,
    func_per_sample,
    loop_per_sample,
    make_analog,
)
from torch import nn

transformers = pytest.importorskip("transformers")

B, T, V = 3, 7, 64


def padding_mask():
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return mask


class LM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).logits


def lm_loss(logits, ids, mask):
    """Next-token cross-entropy summed over real (unpadded) positions of each example."""
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (nll * mask[:, 1:]).sum()


def test_gpt2(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = LM(transformers.GPT2LMHeadModel(config).eval())  # eval: no dropout, deterministic
    assert model.m.lm_head.weight is model.m.transformer.wte.weight
    ids, mask = torch.randint(0, V, (B, T)), padding_mask()
    analog = make_analog(tmp_path)
    analog.watch(model, name_filter=["m.transformer.h.*", "m.transformer.wte", "m.lm_head"])
    assert len(analog.modules) == 2 * 4 + 2  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block; wte; lm_head
    got = analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    ref = func_per_sample(model, lm_loss, (ids, mask), (ids, mask), tie_weights=False)
    assert assert_grads_match(got, ref) == 2 * 4 * 2 + 1 + 1  # Conv1D weight+bias, wte, lm_head (no bias)
    tied = func_per_sample(model, lm_loss, (ids, mask), (ids, mask))["m.transformer.wte.weight"]
    total = got["m.lm_head.weight"] + got["m.transformer.wte.weight"]
    torch.testing.assert_close(total, tied, atol=1e-5, rtol=1e-4)


def test_gpt2_position_embedding_cannot_be_per_sample(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=32)
    model = LM(transformers.GPT2LMHeadModel(config))
    ids, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.long)
    analog = make_analog(tmp_path)
    analog.watch(model, name_filter=["m.transformer.wpe"])
    with pytest.raises(ValueError, match="m.transformer.wpe"):
        with analog(data_id=list(range(B))):
            lm_loss(model(ids, mask), ids, mask).backward()


class Classifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits


def cls_loss(logits, labels):
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def test_bert_with_padding_mask(tmp_path):
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = Classifier(transformers.BertForSequenceClassification(config).eval())
    ids, mask, labels = torch.randint(1, V, (B, T)), padding_mask(), torch.tensor([0, 2, 1])
    ids = ids * mask  # pad token 0
    analog = make_analog(tmp_path)
    analog.watch(model, type_filter=[nn.Linear, nn.Embedding], name_filter=["m.bert.encoder.*", "m.bert.pooler.*",
                                                                            "m.classifier", "*word_embeddings",
                                                                            "*token_type_embeddings"])
    assert len(analog.modules) == 2 * 6 + 1 + 1 + 2  # q, k, v, attn-out, intermediate, out; pooler; cls; 2 emb
    got = analog_per_sample(analog, lambda: cls_loss(model(ids, mask), labels), B, mask=mask)
    # torch.func cannot run BERT here: transformers' mask builder branches on ``padding_mask.all()``,
    # data-dependent control flow that vmap refuses; the reference is the batch-size-1 autograd loop
    # (each example alone with its own padding mask).
    ref = loop_per_sample(model, cls_loss, (ids, mask), (labels,))
    assert assert_grads_match(got, ref) == 2 * (2 * 6 + 1 + 1) + 2
    # without the mask the result is the same here: padded positions get a zero output gradient (no real
    # token attends to them and the loss reads only [CLS]); so the mask removed nothing but padding
    nomask = analog_per_sample(analog, lambda: cls_loss(model(ids, mask), labels), B)
    assert assert_grads_match(nomask, ref) == len(got)
