"""A tiny causal transformer of ``nn.Linear`` layers, and one training routine for one or many copies.

``TinyLM`` (pre-LayerNorm GPT): token embeddings, rotary positions, ``n_layers`` blocks of causal
self-attention (``qkv``: d → 3d, ``proj``: d → d) and an MLP (``fc1``: d → d_ff, GELU, ``fc2``: d_ff → d),
a final LayerNorm and an untied ``head`` (d → vocab). Attention is written out (no fused kernel) so the
model runs under ``torch.func.vmap``. ``ATTRIBUTED`` names the Linear layers every method attributes
through (``blocks.*.{qkv,proj,fc1,fc2}``; embeddings and head are left out, for analog and Kronfluence
alike).

``train_models`` trains E copies at once with ``vmap`` over stacked parameters: copy e starts from the
init of ``seeds[e]`` and sees only the rows ``subsets[e]`` (all copies get the same number of rows), in its
own seeded order, for ``epochs`` epochs of Adam (50 warm-up steps, cosine decay) on the mean next-token
cross-entropy over all positions. On CUDA, training (only) runs matmuls in TF32.
The model the benchmark attributes is ``train_models(cfg, tokens, [all rows], [0])``: the same routine,
so that retraining on subsets for the LDS follows exactly the recipe of the attributed model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

ATTRIBUTED = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab: int
    seq_len: int = 32
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    epochs: int = 40
    batch: int = 128
    lr: float = 3e-3


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotary(q), rotary(k)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of (..., T, hd): pairs (x_i, x_{i+hd/2}) rotated by angle t · base^(-2i/hd)."""
    t, hd = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, hd // 2, device=x.device, dtype=torch.float32) * 2 / hd)
    angle = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freq[None, :]  # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class TinyLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits; logits[:, i] predict tokens[:, i + 1]."""
        x = self.tok(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def attributed_modules(model: TinyLM) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in ATTRIBUTED]


def sequence_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed next-token cross-entropy, (B,)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return ce.view(tokens.shape[0], -1).sum(1)


def answer_loss(logits: torch.Tensor, tokens: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
    """Per-query cross-entropy of the answer token tokens[q, pos_q + 1], (Q,)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return F.cross_entropy(logits[rows, answer_pos], tokens[rows, answer_pos + 1], reduction="none")


def init_model(cfg: ModelConfig, seed: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(cfg)


def train_models(cfg: ModelConfig, tokens: torch.Tensor, subsets: Sequence[torch.Tensor], seeds: Sequence[int],
                 device="cpu", order_seed: int = 0, progress: bool = False, on_epoch=None) -> List[TinyLM]:
    """Train len(subsets) copies (copy e: init seed ``seeds[e]``, rows ``subsets[e]``); returns them on ``device``.
    ``on_epoch(epoch, params, lr)``, when given, is called after each epoch (1-based) with the stacked
    parameters (name -> (E, ...)) and the learning rate of the epoch's last step (the trajectory benchmark
    takes its checkpoints there)."""
    if len({len(s) for s in subsets}) != 1 or len(subsets) != len(seeds):
        raise ValueError("train_models needs one seed per subset and subsets of equal size")
    models = [init_model(cfg, s).to(device) for s in seeds]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    subsets = torch.stack([torch.as_tensor(s) for s in subsets]).to(device)  # (E, n)
    tokens = tokens.to(device)
    n_copies, n = subsets.shape
    batch = min(cfg.batch, n)
    steps_per_epoch = n // batch
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    total = cfg.epochs * steps_per_epoch
    warm_cosine = lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine)

    def loss_one(p, b, x):
        return sequence_loss(functional_call(base, (p, b), (x,)), x).mean() / x.shape[1]

    loss_all = vmap(loss_one)
    gen = torch.Generator(device="cpu").manual_seed(order_seed)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not progress, desc=f"train {n_copies} LM(s)")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _epochs(cfg, loss_all, params, buffers, opt, sched, tokens, subsets, batch, gen, bar, on_epoch)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bar.close()
    out = []
    for e in range(n_copies):
        model = TinyLM(cfg).to(device)
        model.load_state_dict({k: v[e].detach() for k, v in {**params, **buffers}.items()})
        out.append(model.eval())
    return out


def _epochs(cfg, loss_all, params, buffers, opt, sched, tokens, subsets, batch, gen, bar, on_epoch=None) -> None:
    n_copies, n = subsets.shape
    steps_per_epoch = n // batch
    for epoch in range(cfg.epochs):
        perm = torch.argsort(torch.rand(n_copies, n, generator=gen), 1).to(subsets.device)
        rows = torch.gather(subsets, 1, perm)
        for s in range(steps_per_epoch):
            x = tokens[rows[:, s * batch:(s + 1) * batch]]  # (E, B, T)
            loss = loss_all(params, buffers, x).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            bar.update()
        if on_epoch is not None:
            on_epoch(epoch + 1, params, lr)
