"""``integrations.hf.log_causal_lm`` runs every pass a LoGra init needs (statistics, query, logging).

Reference: the same passes written out by hand — ``for phase in AnaLogScheduler(run)`` around
``with run(data_id=ids, mask=mask): causal_lm_loss(model(...).logits, labels).backward()`` with the
labels built here (the input ids with −100 on padding, or a query batch's own ``labels``). Both sides
run the same float32 operations in the same order on the CPU, so projections, query Grams and stored
rows must be equal exactly.
"""

import re
from pathlib import Path

import pytest
import torch

from analog import AnaLog, AnaLogScheduler
from analog.integrations.hf import causal_lm_loss, log_causal_lm

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"
V, T = 40, 6
# the default watch of the one-layer Llama: embedding, q/k/v/o, gate/up/down, two layer norms, final norm, lm_head
WATCHED = 12


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def lm_batches(n_batches, size, seed, first_id=0):
    """Right-padded batches {input_ids, attention_mask, ids}; each batch's last sequence is 2 tokens shorter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        ids = torch.randint(1, V, (size, T), generator=g)
        mask = torch.ones(size, T, dtype=torch.long)
        mask[-1, T - 2:] = 0
        first = first_id + b * size
        out.append({"input_ids": ids * mask, "attention_mask": mask, "ids": list(range(first, first + size))})
    return out


def with_answer_labels(batches, prompt=3):
    """Query batches whose labels score only the tokens after the first ``prompt`` (−100 on the prompt)."""
    out = []
    for b in batches:
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        labels[:, :prompt] = -100
        out.append({**b, "labels": labels})
    return out


def make_run(root, init, project="p"):
    run = AnaLog(project, {"root_dir": str(root), "compression": {"type": "logra", "rank": 3, "init": init},
                           "hessian": "none", "save": True, "progress": False,
                           "storage": {"dtype": "float32"}})
    return run


def spy_grams(run):
    """Record the reduced query Grams handed to the projector (the real method still runs)."""
    seen, fit = [], run.projector.fit_query
    run.projector.fit_query = lambda grams: (seen.append(grams), fit(grams))[1]
    return seen


def block(run, model, batch, data_id, labels=None):
    mask = batch["attention_mask"]
    if labels is None:
        labels = batch["input_ids"].masked_fill(mask == 0, -100)
    with run(data_id=data_id, mask=mask):
        causal_lm_loss(model(input_ids=batch["input_ids"], attention_mask=mask).logits, labels).backward()
    model.zero_grad(set_to_none=True)


def by_hand(run, model, train, queries):
    """The passes written out with AnaLogScheduler (ids given in every training block)."""
    phases = []
    for phase in AnaLogScheduler(run):
        phases.append(phase)
        for b in queries if phase == "query" else train:
            block(run, model, b, b.get("ids"), b.get("labels") if phase == "query" else None)
    return phases


def stored(run):
    store = run.open_store()
    ids, logs = store.batch(0, len(store))
    return ids, {f"{m}/{k}": t for m, kinds in logs.items() for k, t in kinds.items()}


def assert_same_run(a, b):
    """Equal projection tensors and stored rows; returns (projection tensors, stored fields) compared."""
    assert a.phase == b.phase == "log"
    pa, pb = a.projector.tensors, b.projector.tensors
    assert sorted(pa) == sorted(pb) and pa
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    (ids_a, rows_a), (ids_b, rows_b) = stored(a), stored(b)
    assert ids_a == ids_b
    assert sorted(rows_a) == sorted(rows_b) and rows_a
    for k in rows_a:
        assert torch.equal(rows_a[k], rows_b[k]), k
    return len(pa), len(rows_a)


@pytest.mark.parametrize("init", ["query", "whiten"])
def test_passes_equal_hand_written_scheduler(tmp_path, init):
    model = tiny_llama()
    train, queries = lm_batches(3, 4, seed=1), lm_batches(2, 3, seed=2, first_id=100)
    mine = make_run(tmp_path / "mine", init).watch(model)
    seen_mine = spy_grams(mine)
    log_causal_lm(mine, model, train, progress=False, queries=queries if init == "query" else None)
    ref = make_run(tmp_path / "ref", init).watch(model)
    seen_ref = spy_grams(ref)
    phases = by_hand(ref, model, train, queries)
    assert phases == (["pca", "query", "log"] if init == "query" else ["pca", "log"])
    assert len(mine.modules) == WATCHED
    assert assert_same_run(mine, ref) == (2 * WATCHED, WATCHED)  # P_out, P_in and one stored grad a module
    assert len(mine.open_store()) == 12  # every training sequence, once
    assert len(seen_mine) == len(seen_ref) == (1 if init == "query" else 0)
    for gm, gr in zip(seen_mine, seen_ref):
        assert sorted(gm) == sorted(gr) == sorted(mine.modules)
        assert all(torch.equal(gm[m][s], gr[m][s]) for m in gm for s in ("out", "in"))


def test_random_init_is_one_pass_as_before(tmp_path):
    """No pass needed: one logging pass, finalize() is the caller's (more batches can follow)."""
    model = tiny_llama()
    train = lm_batches(3, 4, seed=1)
    mine = make_run(tmp_path / "mine", "random").watch(model)
    log_causal_lm(mine, model, train[:2], progress=False)
    log_causal_lm(mine, model, train[2:], progress=False)  # not finalized in between
    mine.finalize()
    ref = make_run(tmp_path / "ref", "random").watch(model)
    for b in train:
        block(ref, model, b, b["ids"])
    ref.finalize()
    # random LoGra draws no matrices for the three RMSNorms (d_out = d_in = 1 per group: nothing to compress)
    assert assert_same_run(mine, ref) == (2 * (WATCHED - 3), WATCHED)
    assert len(mine.open_store()) == 12


def test_refusals_before_anything_runs(tmp_path):
    model = tiny_llama()
    train, queries = lm_batches(2, 2, seed=1), lm_batches(1, 2, seed=2)
    run = make_run(tmp_path, "whiten").watch(model)
    with pytest.raises(TypeError, match="one-shot iterator.*generator"):
        log_causal_lm(run, model, (b for b in train), progress=False)
    assert run.phase == "pca" and run._pass_stats is None  # no statistics block ran
    run = make_run(tmp_path, "query", project="q").watch(model)
    with pytest.raises(ValueError, match="queries="):
        log_causal_lm(run, model, train, progress=False)
    assert run.phase == "pca" and run._pass_stats is None
    run = make_run(tmp_path, "random", project="r").watch(model)
    with pytest.warns(UserWarning, match="queries= is unused"):
        log_causal_lm(run, model, train, progress=False, queries=queries)
    run.finalize()


def test_query_labels_are_honoured(tmp_path):
    """A ``labels`` key in a query batch replaces the mask-built labels: other Grams, and those of the
    hand-written pass with the same labels."""
    model = tiny_llama()
    train, plain = lm_batches(3, 4, seed=1), lm_batches(2, 3, seed=2, first_id=100)
    answers = with_answer_labels(plain)
    runs, grams = {}, {}
    for name, queries in (("answers", answers), ("plain", plain)):
        runs[name] = make_run(tmp_path / name, "query").watch(model)
        grams[name] = spy_grams(runs[name])
        log_causal_lm(runs[name], model, train, progress=False, queries=queries)
    ref = make_run(tmp_path / "ref", "query").watch(model)
    grams["ref"] = spy_grams(ref)
    by_hand(ref, model, train, answers)
    assert assert_same_run(runs["answers"], ref) == (2 * WATCHED, WATCHED)
    (ga,), (gp,), (gr,) = grams["answers"], grams["plain"], grams["ref"]
    compared = 0
    for m in ga:
        for s in ("out", "in"):
            assert torch.equal(ga[m][s], gr[m][s])
            assert not torch.allclose(ga[m][s], gp[m][s], rtol=1e-3, atol=0)
            compared += 1
    assert compared == 2 * WATCHED


def test_readme_hf_block_runs_as_written(tmp_path, monkeypatch):
    """The README's Hugging Face block (init: query, int4, raw) on the tiny Llama, in a temporary directory."""
    text = README.read_text(encoding="utf-8").split("## Distributed, compile, mixed precision, Hugging Face", 1)[1]
    code = re.search(r"```python\n(.*?)```", text.split("\n## ", 1)[0], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_llama(), "batches": lm_batches(3, 4, seed=1),
                 "query_batches": with_answer_labels(lm_batches(2, 3, seed=2))}
    exec(compile(code, str(README), "exec"), namespace)
    run = namespace["run"]
    assert run.phase == "log" and run.curvature.meta["finalized"]  # the scheduler finalized
    assert stored(run)[0] == list(range(12))


def test_one_bar_per_pass_names_the_pass(tmp_path, capsys):
    model = tiny_llama()
    run = make_run(tmp_path, "query").watch(model)
    log_causal_lm(run, model, lm_batches(2, 2, seed=1), progress=True, queries=lm_batches(1, 2, seed=2))
    err = capsys.readouterr().err
    names = ["pass 1/3: statistics (training batches)", "pass 2/3: query sample", "pass 3/3: logging sequences"]
    assert [n in err for n in names] == [True] * 3
