"""A synthetic fact corpus for fact tracing: which training sequences state the fact a query asks?

Vocabulary (word level, one token per word): ``<pad>``, ``<bos>``, entity names, cities, foods, the
words of the templates, and ``n_filler`` filler words. Everything is drawn from one seeded generator.

Training sequences all have exactly ``seq_len`` tokens: ``<bos>``, one *statement*, filler text
(``statement_at="random"`` puts the statement anywhere in the filler instead). Filler text follows a
fixed random bigram chain (each filler word has
``FILLER_BRANCH`` likely successors), so the model can learn part of it, as it would learn language.
Statements, one per sequence:

- the **fact** of each entity, ``lives`` (entity → city), stated in 2 or 3 sequences with one template
  drawn per fact from ``LIVES_TEMPLATES`` (``paraphrase=True``: a different template each time);
- **distractors** about the same entity: ``works`` (entity → another city, 1–2 sequences) and ``likes``
  (entity → food, 1 sequence); they share the entity token but not the answer;
- cities are shared by many entities, so other entities' facts share the answer token;
- the remaining sequences hold filler only.

A **query** asks the fact of one entity: ``<bos>`` + a ``lives`` template its fact was stated with, up to
the city, and the city;
its loss is the cross-entropy of the city token alone. Its **sources** are the training sequences that
state that fact. Shapes: ``train_tokens`` (N, seq_len) int64; ``query_tokens`` (Q, L) right-padded with
``<pad>``; ``query_answer_pos`` (Q,) the position whose *next-token prediction* is the city (i.e. the
logits at that position score the city at position + 1).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import numpy as np
import torch

LIVES_TEMPLATES = (
    "{E} lives in {C} .",
    "the home of {E} is {C} .",
    "{E} resides in the city of {C} .",
)
WORKS_TEMPLATES = ("{E} works in {C} .", "the office of {E} is in {C} .")
LIKES_TEMPLATES = ("{E} likes to eat {F} .",)
FILLER_BRANCH = 4


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    n_entities: int = 384
    n_cities: int = 48
    n_foods: int = 32
    n_filler: int = 256
    n_train: int = 8192
    seq_len: int = 32
    n_queries: int = 256
    seed: int = 0
    #: "start": the statement opens the sequence (filler after it), so the entity is the only key to the
    #: answer; "random": anywhere in the filler (a tiny LM then memorises the filler before it as the key).
    statement_at: str = "start"
    #: False: a fact's 2–3 statements share one template (drawn per fact), so every source holds the query's
    #: words; True: each statement in another template (only one source then matches the query's words, and
    #: the others were found by no method, compressed or not: recall@2 ≈ 0.42 for all on the CPU preset).
    paraphrase: bool = False


@dataclasses.dataclass
class Corpus:
    config: CorpusConfig
    vocab: List[str]
    train_tokens: torch.Tensor  # (N, seq_len)
    query_tokens: torch.Tensor  # (Q, L)
    query_answer_pos: torch.Tensor  # (Q,)
    query_entity: np.ndarray  # (Q,) entity index of each query
    sources: List[np.ndarray]  # per query: training rows stating its fact
    kinds: np.ndarray  # (N,) "lives" / "works" / "likes" / "filler"

    @property
    def n_train(self) -> int:
        return self.train_tokens.shape[0]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] != "<pad>")


def _names(rng: np.random.Generator, n: int, syllables: List[str], n_syl: int, taken: set) -> List[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(syllables, n_syl))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _words(templates) -> List[str]:
    return sorted({w for t in templates for w in t.split() if not w.startswith("{")})


def build_corpus(config: CorpusConfig = CorpusConfig()) -> Corpus:
    rng = np.random.default_rng(config.seed)
    syl = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "dri", "ne", "pa", "zu", "gor", "fe", "li", "ba", "qui"]
    taken: set = set()
    entities = _names(rng, config.n_entities, syl, 3, taken)
    cities = [n + "ville" for n in _names(rng, config.n_cities, syl, 2, taken)]
    foods = [n + "o" for n in _names(rng, config.n_foods, syl, 2, taken)]
    fillers = [f"w{i}" for i in range(config.n_filler)]
    words = _words(LIVES_TEMPLATES + WORKS_TEMPLATES + LIKES_TEMPLATES)
    vocab = ["<pad>", "<bos>", *words, *entities, *cities, *foods, *fillers]
    index = {w: i for i, w in enumerate(vocab)}
    lives = rng.integers(0, config.n_cities, config.n_entities)
    works = (lives + rng.integers(1, config.n_cities, config.n_entities)) % config.n_cities  # never = lives
    likes = rng.integers(0, config.n_foods, config.n_entities)

    statements: List[tuple] = []  # (kind, entity, tokens)
    stated: List[np.ndarray] = []  # per entity: the lives templates its fact is stated with
    for e, name in enumerate(entities):
        slots = {"{E}": name, "{C}": cities[lives[e]]}
        n_stated = rng.integers(2, 4)
        if config.paraphrase:  # each statement of the fact in another template
            stated.append(rng.permutation(len(LIVES_TEMPLATES))[:n_stated])
        else:  # the same template every time (the sequences differ in their filler)
            stated.append(np.repeat(rng.integers(len(LIVES_TEMPLATES)), n_stated))
        for t in stated[-1]:
            statements.append(("lives", e, _fill(LIVES_TEMPLATES[t], slots, index)))
        slots = {"{E}": name, "{C}": cities[works[e]]}
        for t in rng.permutation(len(WORKS_TEMPLATES))[: rng.integers(1, 3)]:
            statements.append(("works", e, _fill(WORKS_TEMPLATES[t], slots, index)))
        statements.append(("likes", e, _fill(LIKES_TEMPLATES[0], {"{E}": name, "{F}": foods[likes[e]]}, index)))
    if len(statements) > config.n_train:
        raise ValueError(f"{len(statements)} statements do not fit into n_train={config.n_train} sequences")

    successors = rng.integers(0, config.n_filler, (config.n_filler, FILLER_BRANCH))
    filler0 = index[fillers[0]]
    rows, kinds, entity_of = [], [], []
    for kind, e, toks in statements + [("filler", -1, [])] * (config.n_train - len(statements)):
        rows.append(_sequence(rng, toks, config.seq_len, successors, filler0, index["<bos>"],
                              config.statement_at == "start"))
        kinds.append(kind)
        entity_of.append(e)
    order = rng.permutation(config.n_train)
    train = torch.tensor(np.stack(rows)[order], dtype=torch.int64)
    kinds_arr, entity_arr = np.array(kinds)[order], np.array(entity_of)[order]

    q_entities = np.sort(rng.choice(config.n_entities, config.n_queries, replace=False))
    q_rows, q_pos, sources = [], [], []
    for e in q_entities:
        template = LIVES_TEMPLATES[rng.choice(stated[e])]
        toks = [index["<bos>"], *_fill(template, {"{E}": entities[e], "{C}": cities[lives[e]]}, index)]
        q_pos.append(toks.index(index[cities[lives[e]]]) - 1)
        q_rows.append(toks)
        sources.append(np.flatnonzero((kinds_arr == "lives") & (entity_arr == e)))
    width = max(len(r) for r in q_rows)
    q_tokens = torch.tensor([r + [index["<pad>"]] * (width - len(r)) for r in q_rows], dtype=torch.int64)
    return Corpus(config, vocab, train, q_tokens, torch.tensor(q_pos), q_entities, sources, kinds_arr)


def _fill(template: str, slots: Dict[str, str], index: Dict[str, int]) -> List[int]:
    return [index[slots.get(w, w)] for w in template.split()]


def _sequence(rng, statement: List[int], seq_len: int, successors, filler0: int, bos: int,
              at_start: bool) -> List[int]:
    """``<bos>`` + bigram filler with ``statement`` spliced in (first, or at a random position); seq_len tokens."""
    n_fill = seq_len - 1 - len(statement)
    word = int(rng.integers(successors.shape[0]))
    fill = []
    for _ in range(n_fill):
        fill.append(filler0 + word)
        word = int(successors[word, rng.integers(successors.shape[1])])
    at = 0 if at_start else int(rng.integers(0, n_fill + 1))
    return [bos, *fill[:at], *statement, *fill[at:]]
