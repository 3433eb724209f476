"""Reading chosen fields of a store alone (``LogStore.field_rows``, ``batch(modules=, kinds=)``): the values
of those columns of the whole-row read, for every store dtype, across chunk boundaries and fields that start
mid-byte; only the field's own bytes are decoded; ``read_cost`` is its per-row memory formula."""

import pytest
import torch
from random_store import write_random_store

from analog.storage.encoding import STORE_DTYPES

#: odd sizes: in int4 and int2 stores every field after the first starts mid-byte (offsets 9, 13, 18, 25)
FIELDS = [
    {"module": "a", "kind": "grad", "shape": [3, 3]},
    {"module": "a", "kind": "forward", "shape": [4]},
    {"module": "b", "kind": "grad", "shape": [5]},
    {"module": "c", "kind": "grad", "shape": [7]},
    {"module": "d", "kind": "grad", "shape": [1]},
]
SIZES = [9, 4, 5, 7, 1]
OFFSETS = [0, 9, 13, 18, 25]
N = 29
#: values a byte of each store dtype holds (quantised) and bytes a value (float)
PER_BYTE = {"int8": 1, "int4": 2, "int2": 4}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
WORK = {"float32": 0, "float16": 0, "bfloat16": 0, "int8": 4, "int4": 5, "int2": 16}


def write_store(path, dtype, n=N, fields=FIELDS, flush_bytes=200, seed=0):
    """n rows of Gaussian values at row-dependent magnitudes in several chunks; ids ex0.."""
    return write_random_store(path, dtype, fields, n, flush_bytes, seed, id_of="ex{}".format)


@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_field_rows_equal_the_columns_of_whole_rows(tmp_path, dtype):
    store = write_store(tmp_path / "s", dtype)
    assert len(store._maps) >= 3, "the ranges below cross chunk boundaries"
    compared = 0
    for start, stop in [(0, 1), (0, N), (3, 17), (11, 12), (28, 29), (5, 5)]:
        whole = store.rows(start, stop)
        for f, (o, s) in enumerate(zip(OFFSETS, SIZES)):
            got = store.field_rows(start, stop, f)
            assert got.dtype == store.torch_dtype and got.shape == (stop - start, s)
            assert torch.equal(got, whole[:, o : o + s])
            out = torch.full((stop - start, s), float("nan"), dtype=torch.float64)
            assert store.field_rows(start, stop, f, out=out) is out
            assert torch.equal(out, whole[:, o : o + s].double())
            compared += 2 * got.numel()
    assert compared == 2 * (1 + N + 14 + 1 + 1 + 0) * sum(SIZES)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_field_rows_are_views_of_the_map(tmp_path, dtype):
    store = write_store(tmp_path / "s", dtype)
    rows = store.rows(0, 4)  # one chunk: a view of the map
    for f, o in enumerate(OFFSETS):
        assert store.field_rows(0, 4, f).data_ptr() == rows[:, o].data_ptr()


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
def test_quantised_field_rows_decode_only_that_fields_bytes(tmp_path, dtype, monkeypatch):
    """Every value byte the codec unpacks for field f belongs to the bytes that hold f's values, counted
    by an explicit formula: bytes ⌊o / p⌋ .. ⌈(o + s) / p⌉ of the values, p values a byte; whole rows are
    never decoded."""
    store = write_store(tmp_path / "s", dtype)
    codec = store.codec
    seen = []
    inner = codec.unscaled

    def counted(raw, skip, n):
        seen.append((raw.shape, skip, n))
        return inner(raw, skip, n)

    def refuse(raw):
        raise AssertionError("a whole row was decoded")

    monkeypatch.setattr(codec, "unscaled", counted)
    monkeypatch.setattr(codec, "decode", refuse)
    p = PER_BYTE[dtype]
    row_value_bytes = -(-sum(SIZES) // p)
    for f, (o, s) in enumerate(zip(OFFSETS, SIZES)):
        seen.clear()
        store.field_rows(2, 27, f, out=torch.empty(25, s, dtype=torch.float64))
        first, end = o // p, -(-(o + s) // p)
        assert sum(shape[0] for shape, _, _ in seen) == 25, "every row once, chunk part by part"
        assert all(shape[1] == end - first and skip == o - first * p and n == s for shape, skip, n in seen), seen
        assert end - first < row_value_bytes
        assert codec.read_bytes(f) == 4 + end - first
    assert len(seen) >= 2, "the rows span several chunks"


@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_read_cost_is_the_documented_formula(tmp_path, dtype):
    """c = Σ_f (itemsize · n_f + mapped bytes of f) + work_bytes · max n_f, the mapped bytes written out by hand."""
    store = write_store(tmp_path / "s", dtype, n=4)

    def mapped(f):
        if dtype in ITEMSIZE:
            return ITEMSIZE[dtype] * SIZES[f]
        p = PER_BYTE[dtype]
        return 4 + -(-(OFFSETS[f] + SIZES[f]) // p) - OFFSETS[f] // p

    for fields in ([0], [2, 3], [0, 2, 3, 4], list(range(len(FIELDS)))):
        expect = sum(8 * SIZES[f] + mapped(f) for f in fields) + WORK[dtype] * max(SIZES[f] for f in fields)
        assert store.read_cost(fields) == expect
        assert store.read_cost(fields, itemsize=4) == expect - 4 * sum(SIZES[f] for f in fields)
    assert store.read_cost([]) == 0


def test_batch_of_chosen_modules_and_kinds(tmp_path):
    store = write_store(tmp_path / "s", "int4")
    whole_ids, whole = store.batch(3, 20)
    ids, logs = store.batch(3, 20, modules=["a", "c"], kinds=["grad"])
    assert ids == whole_ids and {m: list(k) for m, k in logs.items()} == {"a": ["grad"], "c": ["grad"]}
    for m in ("a", "c"):
        assert torch.equal(logs[m]["grad"], whole[m]["grad"])
    _, forward = store.batch(3, 20, kinds=["forward"])
    assert list(forward) == ["a"] and torch.equal(forward["a"]["forward"], whole["a"]["forward"])
    assert store.select(["d", "b"]) == [2, 4], "store order, whatever the order asked"


def test_unknown_module_or_kind_is_named(tmp_path):
    store = write_store(tmp_path / "s", "float32", n=4)
    with pytest.raises(KeyError, match=r"no module \['zz'\]; it holds \['a', 'b', 'c', 'd'\]"):
        store.batch(0, 2, modules=["a", "zz"])
    with pytest.raises(KeyError, match=r"no log kind \['act'\]"):
        store.select(kinds=["act"])
    with pytest.raises(IndexError, match="field 5 out of range"):
        store.field_rows(0, 2, 5)
    with pytest.raises(ValueError, match=r"out must be \(2, 5\) for field 2 \(module 'b', grad\)"):
        store.field_rows(0, 2, 2, out=torch.empty(2, 4))
