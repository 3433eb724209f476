"""Influence results: scores with the ids that name their rows and columns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file


def _ids(ids: List[Any], n: int = 5) -> str:
    """A short preview of an id list: the first ``n`` ids and how many there are."""
    head = ", ".join(repr(i) for i in ids[:n])
    return f"[{head}{', ...' if len(ids) > n else ''}] ({len(ids)})"


@dataclass(repr=False)
class InfluenceScores:
    """``scores[i, j]`` = influence of training example ``train_ids[j]`` on query ``query_ids[i]``.

    Positive means up-weighting the training example lowers the query's loss (it helps).
    ``per_module`` holds the same matrix split by module when it was asked for (Σ = ``scores``).
    """

    scores: torch.Tensor
    query_ids: List[Any]
    train_ids: List[Any]
    per_module: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:  # the full matrix of a real run would flood a notebook
        return (f"InfluenceScores({self.scores.shape[0]} queries x {self.scores.shape[1]} training examples, "
                f"query_ids={_ids(self.query_ids)}, train_ids={_ids(self.train_ids)}, "
                f"per_module={sorted(self.per_module)}; .scores, .topk(k))")

    def topk(self, k: int = 10) -> Dict[str, List[List[Any]]]:
        """Per query, the ``k`` most helpful (highest) and most harmful (lowest) training ids (all of
        them when there are fewer than ``k``)."""
        if int(k) < 1:
            raise ValueError(f"topk needs k >= 1, got {k}")
        k = min(int(k), self.scores.shape[1])
        helpful = self.scores.topk(k, dim=1).indices.tolist()
        harmful = self.scores.topk(k, dim=1, largest=False).indices.tolist()
        return {
            "helpful": [[self.train_ids[j] for j in row] for row in helpful],
            "harmful": [[self.train_ids[j] for j in row] for row in harmful],
        }

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"scores": self.scores.contiguous()}
        tensors.update({f"module/{m}": s.contiguous() for m, s in self.per_module.items()})
        save_file(tensors, str(path / "scores.safetensors"))
        (path / "ids.json").write_text(json.dumps({"query_ids": self.query_ids, "train_ids": self.train_ids}))

    @classmethod
    def load(cls, path) -> "InfluenceScores":
        path = Path(path)
        tensors = load_file(str(path / "scores.safetensors"))
        ids = json.loads((path / "ids.json").read_text())
        per_module = {k[len("module/"):]: v for k, v in tensors.items() if k.startswith("module/")}
        return cls(tensors["scores"], ids["query_ids"], ids["train_ids"], per_module)


@dataclass(repr=False)
class TopKInfluence:
    """Bounded-memory result: per query, the k highest and k lowest scores and their training ids."""

    query_ids: List[Any]
    helpful_ids: List[List[Any]]
    helpful_scores: torch.Tensor
    harmful_ids: List[List[Any]]
    harmful_scores: torch.Tensor
    n_train: int = 0
    extra: Optional[dict] = None

    def __repr__(self) -> str:
        return (f"TopKInfluence({len(self.query_ids)} queries, top {self.helpful_scores.shape[1]} helpful and harmful "
                f"of {self.n_train} training examples, query_ids={_ids(self.query_ids)}; .helpful_ids, "
                ".helpful_scores, .harmful_ids, .harmful_scores)")

    def topk(self, k: Optional[int] = None) -> Dict[str, List[List[Any]]]:
        """The first ``k`` (default: all kept) helpful and harmful ids per query; more than were kept
        is an error unless every training example was kept."""
        kept = self.helpful_scores.shape[1]
        k = kept if k is None else int(k)
        if k < 1:
            raise ValueError(f"topk needs k >= 1, got {k}")
        if k > kept and kept < self.n_train:
            raise ValueError(f"only the top {kept} of {self.n_train} training examples were kept per query; "
                             f"compute the influence again with topk={k}")
        return {"helpful": [r[:k] for r in self.helpful_ids], "harmful": [r[:k] for r in self.harmful_ids]}


@dataclass(repr=False)
class TokenInfluence:
    """``scores[i, t, j]``: influence of training example ``train_ids[j]`` on position t of query i."""

    scores: torch.Tensor
    query_ids: List[Any]
    train_ids: List[Any]

    def __repr__(self) -> str:
        q, t, n = self.scores.shape
        return (f"TokenInfluence({q} queries x {t} positions x {n} training examples, "
                f"query_ids={_ids(self.query_ids)}, train_ids={_ids(self.train_ids)}; .scores, .sequence_scores())")

    def sequence_scores(self) -> torch.Tensor:
        """Σ over positions: the per-sequence dot scores (n_query × n_train)."""
        return self.scores.sum(1)
