"""Hugging Face integration: log a causal-LM dataset with per-sequence gradients, or log while a
``Trainer`` trains.

Per-sequence loss (what ``log_causal_lm`` backpropagates): the sum over the sequence's predicted
tokens of the next-token cross-entropy, ℓ_i = Σ_{t: label_{i,t+1} ≠ −100} CE(logits_{i,t}, label_{i,t+1}),
so the logged gradient of sequence i is exactly ∇θ ℓ_i, for right and for left padding: padding gets
label −100, and the attention mask passed to ``analog(mask=...)`` never changes a logged gradient (it
only keeps padding out of the curvature statistics, see analog.capture.masks). With left padding the
last pad position's logits predict the first real token, a term of ℓ_i that is logged as it should be.

LoGra inits fitted from passes (``pca``, ``whiten``, ``whiten_pca``: statistics then logging; ``query``:
statistics, a pass over a sample of queries, logging) run all their passes inside ``log_causal_lm``
(``queries=`` feeds the query pass; see its docstring for who calls ``finalize()``).

``AnaLogTrainer`` wraps each training step in ``with analog(...)``. The Trainer's loss is the mean
over the batch's tokens, so the logged gradients are ∇θ ℓ_i / (number of tokens in the batch):
use it to watch training, and ``log_causal_lm`` (a separate pass) for attribution. Put the model in
``eval()`` mode for attribution passes: Hugging Face models are built in training mode, and dropout
would make the logged and the query gradients those of different random sub-networks.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analog.capture.masks import CROSS_ATTENTION_KV, SideMasks, seq2seq_masks
from analog.schedule import AnaLogScheduler

PASS_NAMES = {"pca": "statistics (training batches)", "query": "query sample", "log": "logging sequences"}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over sequences and predicted tokens of the next-token cross-entropy (labels −100 ignored)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")


def _lm_step(analog, model, batch: dict, device, data_id, own_labels: bool = False) -> None:
    """One block: per-sequence loss of ``batch`` backpropagated inside ``with analog(data_id, mask)``.
    Labels: the input ids with −100 on padding, or ``batch["labels"]`` (−100 = not scored) when
    ``own_labels`` and the batch has them (query batches only)."""
    input_ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
    labels = batch.get("labels") if own_labels else None
    labels = input_ids.masked_fill(mask == 0, -100) if labels is None else labels.to(device)
    with analog(data_id=data_id, mask=mask):
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        causal_lm_loss(logits, labels).backward()
    model.zero_grad(set_to_none=True)


def _check_passes(analog, batches, queries) -> None:
    """Refuse, before any pass runs, what the remaining passes cannot be run with."""
    init = analog.projector.init
    if init == "query" and queries is None:
        raise ValueError("LoGra init='query' needs a sample of queries for its query pass: call "
                         "log_causal_lm(analog, model, batches, queries=query_batches) with batches "
                         "{'input_ids', 'attention_mask'} (optionally 'labels', 'ids')")
    if analog.phase == "pca" and iter(batches) is batches:
        raise TypeError(f"LoGra init={init!r} runs a statistics pass and then the logging pass over the same "
                        f"training batches, but batches is a one-shot iterator ({type(batches).__name__}): pass "
                        "a list or a DataLoader (nothing was run)")


def log_causal_lm(analog, model, batches: Iterable[dict], progress: Optional[bool] = None,
                  queries: Optional[Iterable[dict]] = None) -> None:
    """Log every batch ``{"input_ids", "attention_mask", "ids"}`` (ids: one per sequence).

    One pass when the run needs no other (``analog.phase == "log"``: random LoGra, dense, none, or fitted
    projections already loaded): each batch is logged and **the caller calls** ``analog.finalize()``
    (so more batches can be logged first), as before passes existed.

    LoGra ``init`` ``pca``/``whiten``/``whiten_pca`` (a statistics pass over ``batches``, then the logging
    pass) and ``query`` (statistics over ``batches``, a query pass over ``queries``, then logging) run every
    remaining pass through ``AnaLogScheduler``, which **calls** ``analog.finalize()`` **after the logging
    pass** here. ``batches`` must then be re-iterable (a list or DataLoader; a generator is refused with
    a TypeError before anything runs). ``queries``: batches ``{"input_ids", "attention_mask"}``, ``ids``
    optional, with the same per-sequence loss ℓ_i as the training data; a ``labels`` key, when present,
    replaces the labels built from the mask (put −100 on the prompt to score only the answer). ``queries``
    is required by ``init: query`` (ValueError otherwise) and is warned about and unused when no query
    pass remains. ``ids`` are optional in the statistics pass; the logging pass needs them. A ``labels`` key in
    the training ``batches`` is not used: their logged gradient is always ∇θ ℓ_i (module docstring).
    """
    show = analog.progress if progress is None else progress
    device = next(model.parameters()).device
    query_pass = analog.phase == "query" or (analog.phase == "pca" and analog.projector.init == "query")
    if queries is not None and not query_pass:
        warnings.warn(f"log_causal_lm: queries= is unused: this run has no query pass left (LoGra init='query' "
                      f"only; phase {analog.phase!r})", stacklevel=2)
    if analog.phase == "log":
        for batch in tqdm(batches, desc="logging sequences", disable=not show):
            _lm_step(analog, model, batch, device, batch["ids"])
        return
    _check_passes(analog, batches, queries)
    scheduler = AnaLogScheduler(analog)
    total = len(scheduler)  # counted before the first pass: it shrinks as the run moves on
    for i, phase in enumerate(scheduler, 1):
        data = queries if phase == "query" else batches
        for batch in tqdm(data, desc=f"pass {i}/{total}: {PASS_NAMES[phase]}", disable=not show):
            data_id = batch["ids"] if phase == "log" else batch.get("ids")
            _lm_step(analog, model, batch, device, data_id, own_labels=phase == "query")


def query_causal_lm(analog, model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """The gradient log of a query batch (e.g. generated text) in analysis mode."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    labels = input_ids.masked_fill(mask == 0, -100)
    with analog(mask=mask):
        causal_lm_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
    model.zero_grad(set_to_none=True)
    return analog.get_log()


def trainer_mask(model, inputs: dict):
    """The statistics mask of a Trainer batch: per side for an encoder-decoder (analog.capture.masks)."""
    mask = inputs.get("attention_mask")
    config = getattr(getattr(model, "module", model), "config", None)
    if mask is None or not getattr(config, "is_encoder_decoder", False):
        return mask
    decoder = inputs.get("decoder_attention_mask")
    if decoder is None:
        return SideMasks({p: mask for p in ("encoder", *CROSS_ATTENTION_KV)})
    return seq2seq_masks(mask, decoder)


def make_trainer_class():
    """``AnaLogTrainer``: a ``transformers.Trainer`` whose training steps run inside ``with analog(...)``.

    Construct it with ``analog=`` and ``id_key=`` (the batch key holding one id per example; it is
    removed before the model sees the batch). Ids must be unique in a store, so with ``save=True`` log
    one epoch (or use ids that include the epoch); ``save=False`` keeps only statistics.
    """
    from transformers import Trainer

    class AnaLogTrainer(Trainer):
        def __init__(self, *args, analog=None, id_key: str = "ids", **kwargs):
            if analog is None:
                raise ValueError("AnaLogTrainer needs analog=AnaLog(...) with a watched model")
            super().__init__(*args, **kwargs)
            self.analog, self.id_key = analog, id_key

        def training_step(self, model, inputs, *args, **kwargs):
            if self.id_key not in inputs:
                raise KeyError(f"batch has no {self.id_key!r} key; keep it with remove_unused_columns=False "
                               "and a collator that passes it through")
            ids = inputs.pop(self.id_key)
            with self.analog(data_id=ids, mask=trainer_mask(model, inputs)):
                return super().training_step(model, inputs, *args, **kwargs)

    return AnaLogTrainer


def __getattr__(name: str):
    """``from analog.integrations.hf import AnaLogTrainer`` builds the class on first use (transformers is optional)."""
    if name == "AnaLogTrainer":
        return make_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
