"""Shared by the Hugging Face capture tests: a causal LM wrapped to take (ids, mask) and return logits, and
its next-token loss summed over the unpadded positions of each example, and a small padded batch."""

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


def padded(b: int, t: int, vocab: int):
    """(ids (b, t), mask (b, t)) with seed 1: example 1 padded from position 4, example 2 from position 2
    (padded ids are 0), the other ids drawn from 1..vocab−1."""
    torch.manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return torch.randint(1, vocab, (b, t)) * mask, mask
