"""Hugging Face GPT-2 and BERT (tiny configs, random init, no download) with padding and attention masks.

What is watched and why:

* position embeddings (GPT-2 ``wpe``, BERT ``position_embeddings``) are watched by default: their input
  is ``position_ids`` of shape (1, T), shared by the whole batch; analog expands their output to the
  batch and hooks the expanded tensor (analog.capture.broadcast), so their per-sample gradients are exact.
* T5's ``relative_attention_bias`` (no batch dimension at all) is left out with a warning and refused
  when named, even when the batch size equals the sequence length.
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
    tied_sums,
)
from hf_lm_helpers import LM
from torch import nn

from analog.capture.masks import seq2seq_masks

transformers = pytest.importorskip("transformers")

B, T, V = 3, 7, 64


def padding_mask():
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return mask


def lm_loss(logits, ids, mask):
    """Next-token cross-entropy summed over real (unpadded) positions of each example."""
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (nll * mask[:, 1:]).sum()


def test_gpt2(tmp_path):
    """Default watch: every Conv1D, LayerNorm, both embeddings and lm_head; 100 % coverage; all exact."""
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = LM(transformers.GPT2LMHeadModel(config).eval())  # eval: no dropout, deterministic
    assert model.m.lm_head.weight is model.m.transformer.wte.weight
    ids, mask = torch.randint(0, V, (B, T)), padding_mask()
    analog = make_analog(tmp_path)
    analog.watch(model)
    # per block: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; wte, wpe, ln_f, lm_head
    assert len(analog.modules) == 2 * 6 + 4 and "m.transformer.wpe" in analog.modules
    assert analog.coverage.complete and analog.coverage.uncovered == []
    got = analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    ref = func_per_sample(model, lm_loss, (ids, mask), (ids, mask), tie_weights=False)
    assert assert_grads_match(got, ref) == 2 * (4 * 2 + 2 * 2) + 5  # per block 4 Conv1D, 2 LN; wte wpe ln_f lm_head
    tied = func_per_sample(model, lm_loss, (ids, mask), (ids, mask))["m.transformer.wte.weight"]
    total = got["m.lm_head.weight"] + got["m.transformer.wte.weight"]
    torch.testing.assert_close(total, tied, atol=1e-5, rtol=1e-4)


def test_gpt2_position_embedding_batch_equals_one_at_a_time(tmp_path):
    """The issue's symptom: a batch of queries must score like the same queries one at a time (no ids)."""
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=32)
    torch.manual_seed(0)
    model = LM(transformers.GPT2LMHeadModel(config).eval())
    ids, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.long)
    analog = make_analog(tmp_path)
    analog.watch(model, name_filter=["m.transformer.wpe"])
    analog.eval()
    with analog():
        lm_loss(model(ids, mask), ids, mask).backward()
    batch = analog.get_log()[1]["m.transformer.wpe"]["grad"]
    singles = []
    for i in range(B):
        with analog():
            lm_loss(model(ids[i:i + 1], mask[i:i + 1]), ids[i:i + 1], mask[i:i + 1]).backward()
        singles.append(analog.get_log()[1]["m.transformer.wpe"]["grad"])
    assert batch.shape[0] == B
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-5, rtol=1e-4)


def t5_model(d_model=16):
    config = transformers.T5Config(vocab_size=V, d_model=d_model, d_kv=8, d_ff=24, num_layers=1,
                                   num_decoder_layers=1, num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_t5_relative_bias_left_out_and_refused(tmp_path):
    model = t5_model()
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="relative_attention_bias"):
        analog.watch(model)
    assert not any("relative_attention_bias" in n for n in analog.modules)
    reasons = {u.module: u.reason for u in analog.coverage.uncovered}
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias" in reasons
    assert "not recoverable" in reasons["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    with pytest.raises(ValueError, match=f"{name}.*not recoverable"):
        make_analog(tmp_path).watch(model, name_filter=[name])


def test_t5_batch_equal_to_sequence_length_is_exact(tmp_path):
    """B == T == q_len: no shape check could tell the relative bias apart; the default watch never
    selects it, and everything it does log equals the batch-size-1 reference (per-side masks)."""
    model = t5_model()
    n = 4
    ids, dec = torch.randint(1, V, (n, n)), torch.randint(1, V, (n, n))
    enc_mask = torch.ones(n, n, dtype=torch.long)
    enc_mask[1, 3:] = 0

    def loss(logits, labels):
        return nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")

    class Seq2Seq(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask, dec):
            return self.m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits

    wrapped = Seq2Seq(model)
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="relative_attention_bias"):
        analog.watch(wrapped)
    with pytest.raises(ValueError, match="encoder-decoder"):
        with analog(data_id=list(range(n)), mask=enc_mask):
            pass
    masks = seq2seq_masks(enc_mask, torch.ones(n, n))  # cross-attention k/v read encoder positions
    got = analog_per_sample(analog, lambda: loss(wrapped(ids, enc_mask, dec), dec), n, mask=masks)
    ref = loop_per_sample(wrapped, loss, (ids, enc_mask, dec), (dec,))
    # shared, encoder.embed_tokens, decoder.embed_tokens and lm_head are one tied matrix: their uses add up
    summed = tied_sums(wrapped, got)
    assert len(got) - len(summed) == 2  # three logged uses (shared itself never runs) became one
    assert assert_grads_match(summed, ref) == len(summed)


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
