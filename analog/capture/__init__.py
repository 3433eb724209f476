"""Hooks and per-layer rules that capture per-sample gradients and activations."""

from analog.capture import attention, conv, embedding, linear, norm  # noqa: F401  (register the built-in rules)
from analog.capture.coverage import Coverage
from analog.capture.masks import seq2seq_masks
from analog.capture.rules import LayerRule, find_rule, get_rule, registered_types

__all__ = ["Coverage", "LayerRule", "find_rule", "get_rule", "registered_types", "seq2seq_masks"]
