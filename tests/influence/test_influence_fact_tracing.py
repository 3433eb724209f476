"""A small fact-tracing check: the sequences that state a queried fact are ranked first.

Corpus: ``N_FACTS`` entities each with an attribute token, every fact stated in 2 of the N training
sequences (``e r c``, then filler text from a fixed successor chain), the rest filler, so that the
answer is the one thing a fact sequence teaches that the other sequences do not. A tiny next-token
model (embeddings of the two previous tokens, one hidden layer) memorises it; a query is ``e r → c``,
its loss the answer token's cross-entropy. recall@2 = |top-2 ∩ sources| / 2, averaged over queries.

Random scores: each query's top 2 hit a source with probability 2/N per slot, so the number of hits over
all queries is ≤ Binomial(2Q, 2/(N − 1)) in distribution; ``THRESHOLD`` is set where that tail is < 1e-9
(checked below), so no ranking that ignores the data can pass.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analog import AnaLog, AnaLogScheduler
from analog.analysis import InfluenceFunction

N_FACTS, N_ATTR, N_FILL, N_TRAIN, LENGTH = 16, 6, 12, 96, 6
THRESHOLD = 0.7


def corpus(seed=0):
    """(train tokens (N, LENGTH), queries (Q, 3) = e r c, sources {query: [2 train rows]})."""
    gen = torch.Generator().manual_seed(seed)
    rel, ent0, att0, fill0 = 0, 1, 1 + N_FACTS, 1 + N_FACTS + N_ATTR
    answer = torch.randint(0, N_ATTR, (N_FACTS,), generator=gen)
    successor = torch.randperm(N_FILL, generator=gen)  # filler follows a fixed chain: learnable text

    def filler(n, start=None):
        out = [int(torch.randint(0, N_FILL, (1,), generator=gen)) if start is None else start]
        while len(out) < n:
            out.append(int(successor[out[-1]]))
        return [fill0 + f for f in out]

    rows, sources = [], {}
    for e in range(N_FACTS):
        sources[e] = [len(rows), len(rows) + 1]
        rows += [[ent0 + e, rel, att0 + int(answer[e])] + filler(LENGTH - 3, start=0) for _ in range(2)]
    while len(rows) < N_TRAIN:
        rows.append(filler(LENGTH))
    perm = torch.randperm(N_TRAIN, generator=gen)
    where = perm.argsort()
    tokens = torch.tensor(rows)[perm]
    queries = torch.tensor([[ent0 + e, rel, att0 + int(answer[e])] for e in range(N_FACTS)])
    return tokens, queries, {e: [int(where[i]) for i in s] for e, s in sources.items()}


class Bigram2(nn.Module):
    """Next token from the two previous ones: emb(x_{t-1}) ⊕ emb(x_t) → tanh(Linear) → Linear."""

    def __init__(self, vocab, width=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, 12)
        self.hidden, self.out = nn.Linear(24, width), nn.Linear(width, vocab)

    def forward(self, x):  # (B, T) -> logits (B, T - 1, vocab) for positions 1..T-1
        pairs = torch.cat([self.emb(x[:, :-1]), self.emb(x[:, 1:])], -1)
        return self.out(torch.tanh(self.hidden(pairs)))


def sequence_loss(model, x):
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 2:].flatten(), reduction="sum")


def answer_loss(model, q):
    return F.cross_entropy(model(q[:, :2])[:, -1], q[:, 2], reduction="sum")


@pytest.fixture(scope="module")
def trained():
    tokens, queries, sources = corpus()
    torch.manual_seed(0)
    model = Bigram2(1 + N_FACTS + N_ATTR + N_FILL)
    opt = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(100):
        opt.zero_grad()
        (sequence_loss(model, tokens) / len(tokens)).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(queries[:, :2])[:, -1].argmax(-1) == queries[:, 2]).float().mean()
    assert accuracy == 1.0  # the model answers every query: there is a fact to trace
    return model, tokens, queries, sources


def recall_at_2(scores, sources):
    top = scores.topk(2, dim=1).indices
    return sum(len(set(top[q].tolist()) & set(s)) / len(s) for q, s in sources.items()) / len(sources)


def test_threshold_is_out_of_reach_of_random_scores():
    p, n = 2 / (N_TRAIN - 1), 2 * N_FACTS
    need = math.ceil(THRESHOLD * n)
    tail = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(need, n + 1))
    assert tail < 1e-9
    gen = torch.Generator().manual_seed(1)
    _, _, sources = corpus()
    assert recall_at_2(torch.rand(N_FACTS, N_TRAIN, generator=gen), sources) < THRESHOLD


@pytest.mark.parametrize("hessian, compression", [
    ("ekfac", {"type": "none"}),
    ("kfac", {"type": "logra", "rank": 4}),
    ("raw", {"type": "logra", "rank": 4, "init": "whiten"}),
])
def test_fact_sources_ranked_first(tmp_path, trained, hessian, compression):
    model, tokens, queries, sources = trained
    run = AnaLog("facts", {"root_dir": str(tmp_path), "compression": compression, "hessian": hessian,
                           "progress": False})
    run.watch(model, type_filter=[nn.Linear])
    for _ in AnaLogScheduler(run):
        for i in range(0, N_TRAIN, 32):
            with run(data_id=list(range(i, i + 32))):
                sequence_loss(model, tokens[i : i + 32]).backward()
            model.zero_grad()
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    with run():
        answer_loss(model, queries).backward()
    model.zero_grad()
    scores = run.influence.compute_influence_all(run.get_log()).scores
    assert scores.shape == (N_FACTS, N_TRAIN)
    assert recall_at_2(scores, sources) >= THRESHOLD
