"""How a curvature fit reads the store (analog.hessian.base.store_batches): only the wanted ``grad`` fields,
each decoded alone into float64, in batches whose row count follows a memory budget (``batch_rows``). The
batches equal the whole-row read for float32, int8, int4 and int2 stores; the batch size is the documented
formula, shrinks as rows widen and never goes below one row; ranks split the batches as before; and a raw
or diagonal fit read in small batches equals the explicit Fisher."""

import sys
import weakref
from pathlib import Path

import pytest
import torch

import analog.hessian.base as base
from analog.hessian import build_curvature

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))
from random_store import write_random_store  # noqa: E402

#: grad fields of odd sizes (int4/int2: all but the first start mid-byte) and one forward field in between
FIELDS = [
    {"module": "a", "kind": "grad", "shape": [2, 3]},
    {"module": "a", "kind": "forward", "shape": [5]},
    {"module": "b", "kind": "grad", "shape": [7]},
    {"module": "c", "kind": "grad", "shape": [3, 1]},
]
GRADS = {"a": 6, "b": 7, "c": 3}
N = 41
DTYPES = ["float32", "int8", "int4", "int2"]


def write_store(path, dtype, fields=FIELDS, n=N, flush_bytes=300, seed=0):
    return write_random_store(path, dtype, fields, n, flush_bytes, seed, decades=(-1, 1), per_write=5, id_of=int)


def whole_row_batches(store, size, modules=None):
    """The read before field-wise decoding: every field of each batch decoded, the wanted grads in float64."""
    out = []
    for start in range(0, len(store), size):
        _, logs = store.batch(start, min(start + size, len(store)))
        out.append({m: k["grad"].reshape(len(k["grad"]), -1).double() for m, k in logs.items()
                    if "grad" in k and (modules is None or m in modules)})
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modules", [None, ["c", "a"]])
def test_batches_equal_the_whole_row_read(tmp_path, dtype, modules):
    store = write_store(tmp_path / "s", dtype)
    assert len(store._maps) >= 3
    compared = 0
    for size in (7, 512):
        expected = whole_row_batches(store, size, modules)
        got = list(base.store_batches(store, batch_size=size, modules=modules))
        assert len(got) == len(expected) == -(-N // size)
        for g, e in zip(got, expected):
            assert list(g) == list(e) == [m for m in GRADS if modules is None or m in modules]
            for m in g:
                assert g[m].dtype == torch.float64 and torch.equal(g[m], e[m])
                compared += g[m].numel()
    assert compared == 2 * N * sum(GRADS[m] for m in GRADS if modules is None or m in modules)


def test_batch_rows_is_the_budget_over_the_row_cost(tmp_path):
    """B = max(1, ⌊read_bytes / c⌋), c written out per dtype for the grads of 'a' and 'c' (6 and 3 values,
    at offsets 0 and 18 of the row)."""
    costs = {
        "float32": 8 * 9 + 4 * 9,  # float64 values + mapped float32 values, no working memory
        "int8": 8 * 9 + (4 + 6) + (4 + 3) + 4 * 6,  # + scale and value bytes + float32 q of the largest field
        "int4": 8 * 9 + (4 + 3) + (4 + 2) + 5 * 6,  # 'c' = values 18..20: bytes 9..10
        # 'a' = values 0..5: bytes 0..1; 'c' 18..20: bytes 4..5; working memory with the rotation back
        "int2": 8 * 9 + (4 + 2) + (4 + 2) + 16 * 6,
    }
    for dtype, cost in costs.items():
        store = write_store(tmp_path / dtype, dtype)
        fields = base.grad_fields(store, ["a", "c"])
        assert fields == [0, 3] and store.read_cost(fields) == cost
        for budget in (1, cost - 1, cost, 5 * cost + 3, 2**28):
            assert base.batch_rows(store, fields, budget) == max(1, budget // cost)
        assert base.batch_rows(store, fields) == 2**28 // cost  # the 256 MiB default
    with pytest.raises(ValueError, match="read_bytes must be a positive number of bytes, got 0"):
        base.batch_rows(store, fields, 0)


@pytest.mark.parametrize("dtype, cost_per_value", [("float32", 12), ("int8", 13)])
def test_batch_size_shrinks_with_row_width_and_never_goes_below_one_row(tmp_path, dtype, cost_per_value):
    """One grad field of width w beside a wide forward field (which costs nothing: it is not read); a
    64 KiB budget: B = max(1, ⌊65536 / c(w)⌋), c = 12 w (float32) or 13 w + 4 (int8)."""
    budget, n = 64 * 1024, 25
    sizes = []
    for w in (8, 64, 512, 4096, 16384):
        fields = [{"module": "wide", "kind": "forward", "shape": [20000]},
                  {"module": "m", "kind": "grad", "shape": [w]}]
        store = write_store(tmp_path / f"{dtype}{w}", dtype, fields, n=n, flush_bytes=10**9)
        cost = cost_per_value * w + (4 if dtype == "int8" else 0)
        size = base.batch_rows(store, base.grad_fields(store), budget)
        assert size == max(1, budget // cost)
        batches = [len(b["m"]) for b in base.store_batches(store, modules=["m"], read_bytes=budget)]
        assert batches == [min(size, n - s) for s in range(0, n, size)]
        sizes.append(size)
    expected = {"float32": [682, 85, 10, 1, 1], "int8": [606, 78, 9, 1, 1]}[dtype]
    assert sizes == expected and sizes == sorted(sizes, reverse=True) and min(sizes) == 1


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
def test_only_the_wanted_fields_bytes_are_decoded(tmp_path, dtype, monkeypatch):
    """Counted at the codec: whole rows are never decoded, and the value bytes unpacked a row are those holding
    the wanted grad fields' values, counted by hand below (a byte a field shares with its neighbour is unpacked
    with each): 'a' = values 0..5, the forward field 6..10 (never read), 'b' 11..17, 'c' 18..20."""
    store = write_store(tmp_path / "s", dtype)
    codec = store.codec
    unpacked = []
    inner = codec.unscaled

    def counted(raw, skip, n):
        unpacked.append(raw.shape[0] * raw.shape[1])
        return inner(raw, skip, n)

    def refuse(raw):
        raise AssertionError("whole rows were decoded")

    monkeypatch.setattr(codec, "unscaled", counted)
    monkeypatch.setattr(codec, "decode", refuse)
    value_bytes = {  # {modules: value bytes unpacked a row}, and the row's value bytes
        "int8": ({None: 6 + 7 + 3, "b": 7, "ac": 6 + 3}, 21),
        "int4": ({None: 3 + 4 + 2, "b": 4, "ac": 3 + 2}, 11),  # a: bytes 0..2, b: 5..8, c: 9..10
        "int2": ({None: 2 + 3 + 2, "b": 3, "ac": 2 + 2}, 6),  # a: bytes 0..1, b: 2..4, c: 4..5
    }[dtype]
    assert codec.row_bytes - 4 * len(FIELDS) == value_bytes[1]
    for modules, key in ((None, None), (["b"], "b"), (["a", "c"], "ac")):
        unpacked.clear()
        batches = list(base.store_batches(store, modules=modules, read_bytes=600))
        assert sum(unpacked) == N * value_bytes[0][key]
        assert len(batches) > 1
    assert value_bytes[0]["b"] < value_bytes[0]["ac"] < value_bytes[1]


def test_ranks_split_the_batches_as_before(tmp_path, monkeypatch):
    """World 3: rank r reads batches r, r + 3, …, all of the budget's size; together each row once."""
    store = write_store(tmp_path / "s", "int4")
    budget = 400
    size = base.batch_rows(store, base.grad_fields(store), budget)
    assert 1 < size < N // 3
    reads = {}
    inner = store.field_rows

    def recorded(start, stop, f, out=None):
        reads.setdefault(r, []).append((start, stop))
        return inner(start, stop, f, out)

    monkeypatch.setattr(store, "field_rows", recorded)
    monkeypatch.setattr(base, "world_size", lambda: 3)
    for r in range(3):
        monkeypatch.setattr(base, "rank", lambda r=r: r)
        for _ in base.store_batches(store, read_bytes=budget):
            pass
    starts = list(range(0, N, size))
    rows = []
    for r in range(3):
        spans = sorted(set(reads[r]))
        assert spans == [(s, min(s + size, N)) for i, s in enumerate(starts) if i % 3 == r]
        assert len(reads[r]) == len(spans) * len(GRADS)  # each grad field once per batch
        rows += [i for s, e in spans for i in range(s, e)]
    assert sorted(rows) == list(range(N))


@pytest.mark.parametrize("kind", ["raw", "diagonal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_fit_in_small_batches_equals_the_explicit_fisher(tmp_path, monkeypatch, kind, dtype):
    """F̂ = (1/N) GᵀG from all rows at once (whole-row read) against the fit reading batches of a few rows."""
    store = write_store(tmp_path / "s", dtype)
    monkeypatch.setattr(base, "DEFAULT_READ_BYTES", 500)
    sizes = []
    inner = base.store_batches

    def counted(*args, **kwargs):
        for batch in inner(*args, **kwargs):
            sizes.append(len(next(iter(batch.values()))))
            yield batch

    monkeypatch.setattr(base, "store_batches", counted)
    curvature = build_curvature(kind)
    curvature.finalize(store)
    assert len(sizes) > 3 and max(sizes) < N
    _, logs = store.batch(0, N)
    compared = 0
    for m, k in GRADS.items():
        g = logs[m]["grad"].reshape(N, -1).double()
        fisher = g.T @ g / N
        if kind == "diagonal":
            torch.testing.assert_close(curvature.state[f"{m}/diag"], fisher.diagonal(), rtol=1e-12, atol=0)
        else:
            q, e = curvature.state[f"{m}/evecs"].double(), curvature.state[f"{m}/evals"]
            scale = float(fisher.abs().max())
            torch.testing.assert_close(q @ torch.diag(e) @ q.T, fisher, rtol=1e-5, atol=1e-6 * scale)
        compared += k
    assert compared == sum(GRADS.values())


def test_share_sums_holds_no_batch_past_its_add(tmp_path, monkeypatch):
    """While the next batch is read, no tensor of an earlier batch is alive, and while a module's batch is
    added, none of an earlier batch nor of a module added before: a fit holds one batch of rows at most
    (weak references, not timing)."""
    store = write_store(tmp_path / "s", "int8")
    refs, added, alive = [], [], []  # per batch: {module: weak ref}; per batch: modules added so far
    alive_reading = []
    inner, read = base.store_batches, store.field_rows

    def reading(*args, **kwargs):
        alive_reading.append(sum(r() is not None for batch in refs for r in batch.values()))
        return read(*args, **kwargs)

    def recorded(*args, **kwargs):
        for batch in inner(*args, **kwargs):
            refs.append({name: weakref.ref(g) for name, g in batch.items()})
            added.append([])
            yield batch

    def add(name, total, g):
        earlier = [r for batch in refs[:-1] for r in batch.values()] + [refs[-1][m] for m in added[-1]]
        alive.append(sum(r() is not None for r in earlier))
        added[-1].append(name)
        term = (g * g).sum(0)
        return term if total is None else total.add_(term)

    monkeypatch.setattr(base, "store_batches", recorded)
    monkeypatch.setattr(store, "field_rows", reading)
    sums = base.share_sums(store, add, read_bytes=600)
    assert len(refs) > 2 and len(alive) == len(alive_reading) == len(refs) * len(GRADS)
    assert alive == alive_reading == [0] * len(alive)
    _, logs = store.batch(0, N)
    for m in GRADS:
        g = logs[m]["grad"].reshape(N, -1).double()
        torch.testing.assert_close(sums[m], (g * g).sum(0), rtol=1e-12, atol=0)
