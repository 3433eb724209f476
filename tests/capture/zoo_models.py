"""Tiny models for the model-zoo test, built from configs with random init (no download).

Each ``Case`` holds a model wrapped so that ``model(*inputs)`` returns what ``loss(out, *targets)``
sums over the batch (``reduction="sum"``), the inputs and targets of B examples, the mask to pass to
``analog(mask=...)``, and what the default ``watch`` is expected to leave uncovered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from analog.capture.masks import seq2seq_masks

B, T, V = 4, 6, 40


@dataclass
class Case:
    model: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    targets: Tuple[torch.Tensor, ...]
    loss: Callable[..., torch.Tensor]
    mask: object = None
    uncovered: Dict[str, str] = field(default_factory=dict)  # module suffix -> word expected in the reason


class Wrapped(nn.Module):
    """Calls a Hugging Face model with keyword arguments and returns its logits."""

    def __init__(self, model, keys):
        super().__init__()
        self.m, self.keys = model, keys

    def forward(self, *args):
        return self.m(**dict(zip(self.keys, args))).logits


def padded_ids(pad_right=True):
    torch.manual_seed(1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    if not pad_right:
        mask = mask.flip(1)
    return torch.randint(1, V, (B, T)) * mask, mask


def causal_loss(logits, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def class_loss(logits, labels):
    return F.cross_entropy(logits, labels, reduction="sum")


def seq2seq_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def causal_lm(name: str) -> Case:
    import transformers as tf

    small = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=32, pad_token_id=0)
    configs = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=1)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=1)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**small, num_key_value_heads=1,
                                                                   sliding_window=None)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small, rotary_pct=0.5)),
        # scaled, tied word embedding; (1 + w) RMSNorms
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**small, num_key_value_heads=1, head_dim=8)),
        # per-head q_norm/k_norm on (B, T, heads, head_dim): the (B, T) mask is broadcast over the heads
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, num_key_value_heads=1, head_dim=8)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2,
                                                         n_positions=32)),
    }
    model = Wrapped(configs[name]().eval(), ("input_ids", "attention_mask"))
    ids, mask = padded_ids(pad_right=name != "llama")  # Llama with left padding, the others right
    return Case(model, (ids, mask), (ids, mask), causal_loss, mask=mask)


def bert() -> Case:
    import transformers as tf

    config = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, max_position_embeddings=32, num_labels=3)
    model = Wrapped(tf.BertForSequenceClassification(config).eval(), ("input_ids", "attention_mask"))
    ids, mask = padded_ids()
    return Case(model, (ids, mask), (torch.tensor([0, 2, 1, 2]),), class_loss, mask=mask)


def t5() -> Case:
    import transformers as tf

    config = tf.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
                         num_heads=2, decoder_start_token_id=0)
    model = Wrapped(tf.T5ForConditionalGeneration(config).eval(),
                    ("input_ids", "attention_mask", "decoder_input_ids"))
    ids, mask = padded_ids()
    dec = torch.randint(1, V, (B, T - 2))
    masks = seq2seq_masks(mask, torch.ones(B, T - 2))
    return Case(model, (ids, mask, dec), (dec,), seq2seq_loss, mask=masks,
                uncovered={"relative_attention_bias": "not recoverable"})


def bart() -> Case:
    """Scaled word embeddings (√d), cross-attention named ``encoder_attn``; the learned position embeddings
    (an Embedding subclass looking up positions + 2, not its input) are left out."""
    import transformers as tf

    config = tf.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                           max_position_embeddings=32, scale_embedding=True)
    model = Wrapped(tf.BartForConditionalGeneration(config).eval(),
                    ("input_ids", "attention_mask", "decoder_input_ids"))
    ids, mask = padded_ids()
    dec = torch.randint(1, V, (B, T - 2))
    return Case(model, (ids, mask, dec), (dec,), seq2seq_loss, mask=seq2seq_masks(mask, torch.ones(B, T - 2)),
                uncovered={"embed_positions": "overrides forward"})


def vit() -> Case:
    import transformers as tf

    config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=24, num_labels=3)
    model = Wrapped(tf.ViTForImageClassification(config).eval(), ("pixel_values",))
    torch.manual_seed(2)
    return Case(model, (torch.randn(B, 3, 8, 8),), (torch.tensor([0, 1, 2, 1]),), class_loss,
                uncovered={"m.vit.embeddings": "bare nn.Parameter"})


def bn_cnn() -> Case:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    torch.manual_seed(2)
    return Case(model.eval(), (torch.randn(B, 3, 6, 6),), (torch.tensor([0, 1, 2, 1]),), class_loss)


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids, mask):
        h = self.encoder(self.emb(ids), src_key_padding_mask=mask == 0)
        return self.head((h * mask[..., None]).sum(1))


def transformer_encoder() -> Case:
    torch.manual_seed(0)
    ids, mask = padded_ids()
    return Case(EncoderClassifier().eval(), (ids, mask), (torch.tensor([0, 1, 2, 1]),), class_loss, mask=mask)


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, ids):
        _, (h, _) = self.lstm(self.emb(ids))
        return self.head(h[-1])


def lstm() -> Case:
    torch.manual_seed(0)
    ids, _ = padded_ids()
    return Case(LSTMClassifier().eval(), (ids,), (torch.tensor([0, 1, 2, 1]),), class_loss,
                uncovered={"lstm": "recurrent"})


ZOO = {
    "llama": lambda: causal_lm("llama"), "qwen2": lambda: causal_lm("qwen2"), "mistral": lambda: causal_lm("mistral"),
    "gpt_neox": lambda: causal_lm("gpt_neox"), "gpt2": lambda: causal_lm("gpt2"), "bert": bert, "t5": t5,
    "gemma": lambda: causal_lm("gemma"), "qwen3": lambda: causal_lm("qwen3"), "bart": bart,
    "vit": vit, "bn_cnn": bn_cnn, "transformer_encoder": transformer_encoder, "lstm": lstm,
}
