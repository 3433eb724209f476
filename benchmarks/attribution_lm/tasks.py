"""The attribution tasks every method is run on: the fact-tracing LM and the digits MLP.

A task gives the harness what it needs and nothing more:

- ``fresh_model()``: a copy of the trained model (on ``device``), ``modules``: names to watch;
- ``train_batches()``: ``(ids, batch)`` over the whole training set in order;
- ``train_loss(model, batch)``: the summed per-example training loss (so g_i = ∇θ ℓ_i);
- ``query_loss(model)``: the summed measurement over all queries (one row of scores per query);
- ``calibration_batches(kind)`` / ``calibration_loss(model, batch)``: a sample of queries *other than
  the evaluated ones*, for methods that fit their projection to the kind of query (LoGra
  ``init: query``): ``"heldout"`` = the same kind of query about facts no evaluated query asks (LM:
  the ``lives`` statements of entities that are never queried; digits: the examples of the dataset
  in neither split), ``"other"`` (LM only) = queries of the relations the benchmark never asks
  (``works``, ``likes``), ``"all"`` (LM only) = both;
- ``evaluate(scores)``: quality numbers of a score matrix (n_queries × n_train, positive = helps);
- ``damping``: the task's absolute damping λ, used where a method asks for ``"task"``.

LM (``LMTask``): per-example loss = summed next-token cross-entropy of a training sequence; measurement =
cross-entropy of a query's answer token. Quality: recall@k of the sequences that state the queried fact
(|top-k ∩ sources| / |sources|, mean over queries), MRR of the first source, and the LDS against subset
retraining (``ground_truth.py``). Digits (``DigitsTask``): the task of benchmarks/influence, LDS only.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.attribution_lm.corpus import Corpus
from benchmarks.attribution_lm.model import ModelConfig, TinyLM, answer_loss, attributed_modules, sequence_loss
from benchmarks.influence.lds import lds

RECALL_K = (1, 2, 5, 10)


def fact_tracing(scores: np.ndarray, sources: List[np.ndarray]) -> Dict[str, float]:
    """recall@k (k in RECALL_K) and MRR of the true sources in each query's ranking (higher score first)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    out = {f"recall@{k}": 0.0 for k in RECALL_K}
    rr = 0.0
    for q, src in enumerate(sources):
        is_src = np.isin(order[q], src)
        for k in RECALL_K:
            out[f"recall@{k}"] += is_src[:k].sum() / len(src)
        rr += 1.0 / (1 + int(np.argmax(is_src)))
    n = len(sources)
    return {**{k: v / n for k, v in out.items()}, "mrr": rr / n}


def calibration_queries(corpus: Corpus, kind: str = "heldout") -> Tuple[torch.Tensor, torch.Tensor]:
    """Queries cut from training statements: ``<bos>`` + the statement up to its answer (right-padded),
    and the position whose logits predict the answer. ``heldout``: the ``lives`` statements that are no
    evaluated query's source (facts of entities never queried); ``other``: ``works`` and ``likes``;
    ``all``: both."""
    if kind == "heldout":
        asked = np.concatenate(corpus.sources) if len(corpus.sources) else np.array([], dtype=int)
        rows = np.setdiff1d(np.flatnonzero(corpus.kinds == "lives"), asked)
    elif kind == "other":
        rows = np.flatnonzero(np.isin(corpus.kinds, ["works", "likes"]))
    elif kind == "all":
        asked = np.concatenate(corpus.sources) if len(corpus.sources) else np.array([], dtype=int)
        rows = np.setdiff1d(np.flatnonzero(np.isin(corpus.kinds, ["lives", "works", "likes"])), asked)
    else:
        raise ValueError(f"unknown calibration {kind!r}; use 'heldout', 'other' or 'all'")
    if not len(rows):
        raise ValueError(f"the corpus has no {kind!r} calibration queries (every entity is queried): use 'other'")
    dot = corpus.vocab.index(".")
    seqs, pos = [], []
    for i in rows:
        seq = corpus.train_tokens[i].tolist()
        end = seq.index(dot)  # the answer is seq[end - 1], predicted by the logits at end - 2
        seqs.append(seq[:end])
        pos.append(end - 2)
    width = max(map(len, seqs))
    return torch.tensor([r + [0] * (width - len(r)) for r in seqs]), torch.tensor(pos)


@dataclasses.dataclass
class LMTask:
    name: str
    corpus: Corpus
    model_config: ModelConfig
    state: Dict[str, torch.Tensor]
    ground_truth: Optional[dict]
    device: str = "cpu"
    batch: int = 64
    damping: Optional[float] = None

    @property
    def n_train(self) -> int:
        return self.corpus.n_train

    @property
    def n_queries(self) -> int:
        return self.corpus.query_tokens.shape[0]

    def fresh_model(self) -> TinyLM:
        model = TinyLM(self.model_config)
        model.load_state_dict(self.state)
        return model.to(self.device).eval()

    @property
    def modules(self) -> List[str]:
        return attributed_modules(TinyLM(self.model_config))

    def train_batches(self) -> Iterator[Tuple[List[int], torch.Tensor]]:
        tokens = self.corpus.train_tokens
        for start in range(0, self.n_train, self.batch):
            ids = list(range(start, min(start + self.batch, self.n_train)))
            yield ids, tokens[ids].to(self.device)

    def train_loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        return sequence_loss(model(batch), batch).sum()

    def query_loss(self, model) -> torch.Tensor:
        tokens = self.corpus.query_tokens.to(self.device)
        return answer_loss(model(tokens), tokens, self.corpus.query_answer_pos.to(self.device)).sum()

    def calibration_batches(self, kind: str = "heldout") -> Iterator[Tuple[None, tuple]]:
        tokens, pos = calibration_queries(self.corpus, kind)
        for start in range(0, len(pos), self.batch):
            rows = slice(start, start + self.batch)
            yield None, (tokens[rows].to(self.device), pos[rows].to(self.device))

    def calibration_loss(self, model, batch) -> torch.Tensor:
        tokens, pos = batch
        return answer_loss(model(tokens), tokens, pos).sum()

    def evaluate(self, scores: np.ndarray) -> Dict[str, float]:
        out = fact_tracing(scores, self.corpus.sources)
        if self.ground_truth is not None:
            out["lds"] = lds(scores, self.ground_truth["masks"], self.ground_truth["outputs"])
        return out

    @torch.no_grad()
    def accuracy(self) -> Tuple[float, float]:
        """(fraction of queries whose answer is the argmax, mean answer loss) of the trained model."""
        model = self.fresh_model()
        tokens, pos = self.corpus.query_tokens.to(self.device), self.corpus.query_answer_pos.to(self.device)
        logits = model(tokens)
        rows = torch.arange(len(pos), device=self.device)
        acc = (logits[rows, pos].argmax(-1) == tokens[rows, pos + 1]).float().mean().item()
        return acc, answer_loss(logits, tokens, pos).mean().item()


@dataclasses.dataclass
class DigitsTask:
    """benchmarks/influence's digits MLP (its cached LDS ground truth) behind the same interface."""

    inner: object  # benchmarks.influence.task.Task
    ground_truth: dict
    device: str = "cpu"
    batch: int = 250
    name: str = "digits"

    @property
    def n_train(self) -> int:
        return self.inner.n_train

    @property
    def n_queries(self) -> int:
        return self.inner.n_test

    @property
    def damping(self) -> float:
        return self.inner.damping

    @property
    def modules(self) -> Optional[List[str]]:
        return None  # every Linear

    def fresh_model(self):
        return self.inner.fresh_model().to(self.device)

    def train_batches(self):
        for start in range(0, self.n_train, self.batch):
            ids = list(range(start, min(start + self.batch, self.n_train)))
            yield ids, (self.inner.x_train[ids].to(self.device), self.inner.y_train[ids].to(self.device))

    def train_loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def query_loss(self, model) -> torch.Tensor:
        x, y = self.inner.x_test.to(self.device), self.inner.y_test.to(self.device)
        return F.cross_entropy(model(x), y, reduction="sum")

    def calibration_batches(self, kind: str = "heldout"):
        if kind != "heldout":
            raise ValueError(f"digits has only 'heldout' calibration queries, not {kind!r}")
        x, y = _digits_rest(self.inner.config)
        for start in range(0, len(y), self.batch):
            yield None, (x[start:start + self.batch].to(self.device), y[start:start + self.batch].to(self.device))

    def calibration_loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def evaluate(self, scores: np.ndarray) -> Dict[str, float]:
        return {"lds": lds(scores, self.ground_truth["masks"], self.ground_truth["outputs"])}


def _digits_rest(config) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits examples in neither the training nor the test split (standardised like them)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(config.split_seed).permutation(len(y))
    train_idx, rest = perm[: config.n_train], perm[config.n_train + config.n_test:]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6
    return torch.tensor((x[rest] - mean) / std, dtype=torch.float32), torch.tensor(y[rest], dtype=torch.int64)


def build_digits(device: str = "cpu") -> DigitsTask:
    from benchmarks.influence.ground_truth import load_or_compute
    from benchmarks.influence.task import build_task

    inner = build_task("small")
    return DigitsTask(inner, load_or_compute(inner), device)
