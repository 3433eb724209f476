"""Shared by the Hugging Face capture tests: a causal LM wrapped to take (ids, mask) and return logits, and
its next-token loss summed over the unpadded positions of each example, a small padded batch, tiny configs,
norm weights drawn at random, and a class looked up by dotted path (skipped where transformers lacks it)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class LM(nn.Module):
    """``model(input_ids=ids, attention_mask=mask).logits`` as a plain module of (ids, mask)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).logits


def lm_loss(logits, ids, mask):
    """Σ over examples and unpadded target positions of −log p(ids[t+1] | ids[≤t]) (reduction "sum")."""
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def hf_class(path: str):
    """The class at dotted ``path`` ("transformers.models.x.modeling_x.Cls", "transformers.Qwen3Config"); the
    test is skipped where this transformers version has no such class."""
    module_path, cls_name = path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module_path), cls_name)
    except (ImportError, AttributeError):
        pytest.skip(f"{path} is not in this transformers version")


def lm_config(cls, vocab: int = 50, **kw):
    """A one-layer config of class ``cls``: hidden size 32, 4 query heads over 2 key/value heads, pad id 0."""
    return cls(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, **kw)


def randomise_norms(model: nn.Module) -> None:
    """Norm weights (parameters named "*norm*") drawn from U(−0.5, 0.5): Gemma initialises its norms' w to 0
    (scale 1 + w), and a weight that is the same in every channel would hide a channel mix-up."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5)


def padded(b: int, t: int, vocab: int):
    """(ids (b, t), mask (b, t)) with seed 1: example 1 padded from position 4, example 2 from position 2
    (padded ids are 0), the other ids drawn from 1..vocab−1."""
    torch.manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return torch.randint(1, vocab, (b, t)) * mask, mask
