"""nn.Embedding, read as a Linear from one-hot token vectors.

y_t = Wᵀ e_{i_t} with W of shape (V, D). Taking a_t = one-hot(i_t) ∈ R^V and δ_t = ∂L/∂y_t ∈ R^D,
Σ_t δ_t a_tᵀ is (D × V) = (∂L/∂W)ᵀ: analog's per-sample gradient of an embedding is the transpose
of ``weight.grad``. LoGra never forms the one-hot: a_t P_in is the row P_in[i_t] (a gather).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from analog.capture.rules import LayerRule


class EmbeddingRule(LayerRule, module_type=nn.Embedding):
    def in_dim(self, module: nn.Embedding) -> int:
        return module.num_embeddings

    def out_dim(self, module: nn.Embedding) -> int:
        return module.embedding_dim

    def _mask_padding(self, module, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if module.padding_idx is None:
            return a
        return a * (idx != module.padding_idx).unsqueeze(-1).to(a.dtype)

    def activations(self, module, x):
        idx = x.reshape(x.shape[0], -1)
        a = F.one_hot(idx, module.num_embeddings).to(module.weight.dtype)
        return self._mask_padding(module, idx, a).unsqueeze(2)

    def project_activations(self, module, x, p_in):
        idx = x.reshape(x.shape[0], -1)
        return self._mask_padding(module, idx, p_in[idx]).unsqueeze(2)

    def output_grads(self, module, grad_out):
        return grad_out.reshape(grad_out.shape[0], -1, 1, grad_out.shape[-1])

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        return {"weight": grad[:, 0].transpose(1, 2)}
