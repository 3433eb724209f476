"""nn.Embedding, read as a Linear from one-hot token vectors.

y_t = Wᵀ e_{i_t} with W of shape (V, D). Taking a_t = one-hot(i_t) ∈ R^V and δ_t = ∂L/∂y_t ∈ R^D,
Σ_t δ_t a_tᵀ is (D × V) = (∂L/∂W)ᵀ: analog's per-sample gradient of an embedding is the transpose
of ``weight.grad``. LoGra never forms the one-hot: a_t P_in is the row P_in[i_t] (a gather).

Scaled word embeddings (Gemma, BART and their relatives in Hugging Face) return c · Wᵀ e_{i_t} with a
constant c = ``embed_scale`` (√d): their per-sample gradient is Σ_t c δ_t a_tᵀ, so their rule multiplies δ
by c. Other subclasses of ``nn.Embedding`` that override ``forward`` get no rule (analog.capture.rules).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from analog.capture.rules import LayerRule, probe_like


class EmbeddingRule(LayerRule, module_type=nn.Embedding):
    def in_dim(self, module: nn.Embedding) -> int:
        return module.num_embeddings

    def out_dim(self, module: nn.Embedding) -> int:
        return module.embedding_dim

    def probe_input(self, module, generator):
        return probe_like(module, torch.randint(0, module.num_embeddings, (2, 3), generator=generator))

    def _mask_padding(self, module, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if module.padding_idx is None:
            return a
        return a * (idx != module.padding_idx).unsqueeze(-1).to(a.dtype)

    def activations(self, module, x):
        idx = x.reshape(x.shape[0], -1)
        a = F.one_hot(idx, module.num_embeddings).to(torch.float32)  # captured factors are float32
        return self._mask_padding(module, idx, a).unsqueeze(2)

    def project_activations(self, module, x, p_in):
        idx = x.reshape(x.shape[0], -1)
        return self._mask_padding(module, idx, p_in[idx]).unsqueeze(2)

    def output_grads(self, module, grad_out):
        return grad_out.reshape(grad_out.shape[0], -1, 1, grad_out.shape[-1])

    def param_grads(self, module, grad) -> Dict[str, torch.Tensor]:
        return {"weight": grad[:, 0].transpose(1, 2)}


class ScaledEmbeddingRule(EmbeddingRule):
    """y_t = c · Wᵀ e_{i_t} with c = ``module.embed_scale`` (a float or a 0-d tensor, applied in the weight's
    dtype as the Hugging Face classes do): δ_t is c times the output's gradient."""

    def scale(self, module) -> float:
        c = module.embed_scale
        return float(c.to(module.weight.dtype)) if isinstance(c, torch.Tensor) else float(c)

    def output_grads(self, module, grad_out):
        return super().output_grads(module, grad_out) * self.scale(module)


#: Hugging Face embeddings whose forward is ``super().forward(input_ids) * self.embed_scale`` (transformers 5.x)
HF_SCALED_EMBEDDINGS = tuple(f"transformers.models.{path}ScaledWordEmbedding" for path in (
    "gemma.modeling_gemma.GemmaText", "gemma2.modeling_gemma2.Gemma2Text", "gemma3.modeling_gemma3.Gemma3Text",
    "gemma3n.modeling_gemma3n.Gemma3nText", "vaultgemma.modeling_vaultgemma.VaultGemmaText",
    "bart.modeling_bart.Bart", "mbart.modeling_mbart.MBart", "plbart.modeling_plbart.PLBart",
    "blenderbot.modeling_blenderbot.Blenderbot", "m2m_100.modeling_m2m_100.M2M100",
    "nllb_moe.modeling_nllb_moe.NllbMoe", "xglm.modeling_xglm.XGLM", "biogpt.modeling_biogpt.BioGpt",
    "pegasus_x.modeling_pegasus_x.PegasusX", "bigbird_pegasus.modeling_bigbird_pegasus.BigBirdPegasus",
    "trocr.modeling_trocr.TrOCR", "minicpm3.modeling_minicpm3.MiniCPM3",
))
for _path in HF_SCALED_EMBEDDINGS:
    type(_path.rsplit(".", 1)[1] + "Rule", (ScaledEmbeddingRule,), {}, module_type=_path)
