"""Logs written through AnaLog (save=True) read back exactly, by LogStore and by the DataLoader,
across several chunks, for every storage dtype; contiguous reads are views of the mmap."""

import json
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.storage import LogStore, LogWriter, build_log_dataloader

BATCH, N = 8, 44  # the last batch is short


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_batch(ids):
    salt = torch.tensor([zlib.crc32(str(i).encode()) % 97 for i in ids], dtype=torch.float32)
    k = torch.arange(len(ids), dtype=torch.float32)[:, None] + salt[:, None]
    x = torch.sin(k * 0.37 + torch.arange(6) * 1.3)
    return x, (k[:, 0].long() % 3)


def id_of(kind, i):
    return {"int": i, "str": f"ex-{i}", "mixed": i if i % 2 else f"s{i}"}[kind]


def log_run(root, dtype, id_kind="int", kinds=("grad",)):
    """Log N examples (a chunk every ~2 batches); return the run, ids and the expected tensors (float32)."""
    flush_bytes = 1500 * len(kinds) * {"float32": 4, "float16": 2, "bfloat16": 2}[dtype] // 4
    model = make_model()
    run = AnaLog("rt", {"root_dir": str(root), "compression": {"rank": 4},
                        "storage": {"dtype": dtype, "flush_bytes": flush_bytes}})
    run.update({"log": list(kinds), "save": True})
    run.watch(model)
    all_ids, parts = [], []
    for start in range(0, N, BATCH):
        ids = [id_of(id_kind, i) for i in range(start, min(start + BATCH, N))]
        x, y = make_batch(ids)
        with run(data_id=ids):
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad()
        got_ids, logs = run.get_log()
        assert got_ids == ids
        all_ids += ids
        parts.append({m: {k: t.detach().clone() for k, t in kk.items()} for m, kk in logs.items()})
    run.finalize()
    expected = {m: {k: torch.cat([p[m][k] for p in parts]) for k in parts[0][m]} for m in parts[0]}
    return run, all_ids, expected


def assert_batches_equal(batches, ids, expected, dtype):
    got_ids = [i for b_ids, _ in batches for i in b_ids]
    assert got_ids == ids
    compared = 0
    for m, kinds in expected.items():
        for k, want in kinds.items():
            got = torch.cat([logs[m][k] for _, logs in batches])
            assert got.dtype == dtype
            assert torch.equal(got, want.to(dtype)), (m, k)
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize("dtype_name,dtype", [("float32", torch.float32), ("float16", torch.float16),
                                              ("bfloat16", torch.bfloat16)])
def test_round_trip_every_dtype_several_chunks(tmp_path, dtype_name, dtype):
    run, ids, expected = log_run(tmp_path, dtype_name)
    chunks = sorted(run.log_path.glob("chunk_*.json"))
    assert len(chunks) >= 3, "flush_bytes should have split the logs into several chunks"
    store = LogStore(run.log_path)
    assert len(store) == N and store.ids == ids
    assert set(store.modules) == set(expected) and len(store.modules) == 2
    assert_batches_equal([store.batch(0, N)], ids, expected, dtype)
    for workers in (0, 2):
        loader = run.build_log_dataloader(batch_size=7, num_workers=workers)
        batches = list(loader)
        assert len(batches) == (N + 6) // 7
        assert all(len(b[0]) == 7 for b in batches[:-1])
        assert_batches_equal(batches, ids, expected, dtype)


@pytest.mark.parametrize("id_kind", ["str", "mixed"])
def test_round_trip_string_and_mixed_ids(tmp_path, id_kind):
    run, ids, expected = log_run(tmp_path, "float32", id_kind=id_kind, kinds=("grad", "forward", "backward"))
    store = LogStore(run.log_path)
    assert store.ids == ids
    assert {type(i) for i in store.ids} == ({str} if id_kind == "str" else {int, str})
    assert store.position(ids[13]) == 13
    assert_batches_equal(list(build_log_dataloader(store, 10)), ids, expected, torch.float32)
    with pytest.raises(KeyError, match="not in store"):
        store.position("nope")


def test_int_and_string_ids_are_distinct(tmp_path):
    w = LogWriter(tmp_path / "s", [{"module": "m", "kind": "grad", "shape": [2]}])
    w.write([1, "1"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    w.close()
    store = LogStore(tmp_path / "s")
    assert store.ids == [1, "1"]
    assert torch.equal(store.gather([store.position("1")]), torch.tensor([[3.0, 4.0]]))


def _mapped_ranges(path):
    """Address ranges at which ``path`` is memory-mapped in this process (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _in_mmap(t, path):
    ptr = t.untyped_storage().data_ptr()
    return any(lo <= ptr and t.data_ptr() + t.numel() * t.element_size() <= hi for lo, hi in _mapped_ranges(path))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_contiguous_reads_are_views_of_the_mmap(tmp_path, dtype_name):
    run, ids, expected = log_run(tmp_path, dtype_name)
    store = LogStore(run.log_path)
    first = run.log_path / "chunk_000000.bin"
    n0 = json.loads((run.log_path / "chunk_000000.json").read_text())["n"]
    assert n0 >= 3
    rows = store.rows(1, n0)
    assert _in_mmap(rows, first), "a read within one chunk must not copy"
    offset = 1 * store.row_elems * rows.element_size()  # row 1 of the file
    assert any(lo + offset == rows.data_ptr() for lo, _ in _mapped_ranges(first))
    ids_b, logs = store.batch(0, n0)
    assert all(_in_mmap(t, first) for kinds in logs.values() for t in kinds.values())
    # the first DataLoader batch (no workers) lies in chunk 0 and is a view as well
    (b_ids, b_logs), *_ = build_log_dataloader(store, batch_size=n0)
    assert all(_in_mmap(t, first) for kinds in b_logs.values() for t in kinds.values())
    # copy-on-write: writing to a returned tensor never reaches the file
    before = first.read_bytes()
    rows.zero_()
    assert first.read_bytes() == before
    # a read across two chunks is a copy, and still correct
    across = LogStore(run.log_path).rows(n0 - 1, n0 + 1)
    assert not _in_mmap(across, first)
    np.testing.assert_array_equal(across.float().numpy(), LogStore(run.log_path).gather([n0 - 1, n0]).float().numpy())


def test_empty_store_reads_as_empty(tmp_path):
    w = LogWriter(tmp_path / "e", [{"module": "m", "kind": "grad", "shape": [3]}])
    w.close()
    store = LogStore(tmp_path / "e")
    assert len(store) == 0 and list(build_log_dataloader(store, 4)) == []
    assert store.rows(0, 0).shape == (0, 3)


def test_store_pickles_as_its_path_not_its_data(tmp_path):
    """DataLoader workers started with spawn/forkserver receive the store pickled: it must re-map the
    files, not carry a copy of every row."""
    import pickle

    w = LogWriter(tmp_path / "s", [{"module": "m", "kind": "grad", "shape": [512]}], flush_bytes=1)
    w.write(list(range(64)), torch.randn(64, 512))
    w.close()
    store = LogStore(tmp_path / "s", expect_modules=["m"])
    blob = pickle.dumps(store)
    assert len(blob) < 4096, f"pickled store is {len(blob)} bytes for {64 * 512 * 4} bytes of rows"
    again = pickle.loads(blob)
    assert again.ids == store.ids and torch.equal(again.rows(0, 64), store.rows(0, 64))
