"""int8 stores: per-row, per-field absmax quantisation, checked against an explicit numpy reference of
the formula (analog.storage.encoding), on the bytes on disk and through every read path."""

import numpy as np
import pytest
import torch
from absmax_reference import absmax_reference, check_read_paths, check_verify_flip_repair, cuda_logs

from analog.config import Config
from analog.storage import LogStore, LogWriter, StoreError

FIELDS = [
    {"module": "a", "kind": "grad", "shape": [2, 3]},  # mixed signs
    {"module": "zero", "kind": "grad", "shape": [4]},  # all zero in every row
    {"module": "spike", "kind": "forward", "shape": [5]},  # one huge element among small ones
    {"module": "one", "kind": "grad", "shape": [1]},  # a single value: q = ±127
]
SIZES = [6, 4, 5, 1]
F, E = len(FIELDS), sum(SIZES)
N, BATCH = 37, 5
#: |x − x̂| ≤ scale/2 exactly; float32's division and product add at most a relative 2⁻¹⁵ of it
SLACK = 1 + 2.0**-15


def make_rows(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, E, generator=gen) * torch.logspace(-3, 2, n)[:, None]
    x[:, 6:10] = 0.0
    x[:, 10:15] = torch.rand(n, 5, generator=gen) * 1e-3
    x[:, 12] = -3e6  # the spike: every other value of its field quantises to 0
    x[3, :6] = 0.0  # field "a" of row 3 is all zero as well
    x[:, 15] = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0) * torch.linspace(0.5, 7.0, n)
    return x


def reference(x: np.ndarray):
    """(scales (n, F), q (n, E) int8, x̂ (n, E)) by the formula, in float32 numpy (L = 127)."""
    return absmax_reference(x, SIZES, 127)


def write_store(path, x, flush_bytes=200):
    w = LogWriter(path, FIELDS, "int8", flush_bytes=flush_bytes)
    for start in range(0, len(x), BATCH):
        w.write([f"ex{i}" for i in range(start, min(start + BATCH, len(x)))], x[start : start + BATCH])
    w.close()


def on_disk(path):
    """(scales, q) of every chunk, parsed with a numpy record layout (not analog's reader)."""
    record = np.dtype([("scale", "<f4", (F,)), ("q", "i1", (E,))])
    assert record.itemsize == 4 * F + E
    chunks = sorted(path.glob("chunk_*.bin"))
    parsed = [np.fromfile(c, dtype=record) for c in chunks]
    return chunks, np.concatenate([p["scale"] for p in parsed]), np.concatenate([p["q"] for p in parsed])


def test_int8_round_trip_equals_the_formula_on_disk_and_through_every_read(tmp_path):
    x = make_rows()
    write_store(tmp_path / "s", x)
    ref_s, ref_q, ref_x = reference(x.numpy())
    assert (ref_s[:, 1] == 0).all() and (ref_s[3, :2] == 0).all(), "all-zero fields have scale 0"
    assert (np.abs(ref_q[:, 15]) == 127).all() and (ref_q[:, 10:15] == 0).sum() >= N * 3

    chunks, scales, q = on_disk(tmp_path / "s")
    assert len(chunks) >= 3, "flush_bytes should have split the rows into several chunks"
    sizes = [c.stat().st_size for c in chunks]
    assert sum(sizes) == N * (4 * F + E) and all(s % (4 * F + E) == 0 for s in sizes)
    np.testing.assert_array_equal(scales, ref_s)
    np.testing.assert_array_equal(q, ref_q)

    store = LogStore(tmp_path / "s")
    assert store.row_bytes == 4 * F + E and store.torch_dtype == torch.float32
    rows = store.rows(0, N)
    assert rows.dtype == torch.float32 and rows.shape == (N, E)
    np.testing.assert_array_equal(rows.numpy(), ref_x)
    # the bound, elementwise, with each element's own field scale
    bound = np.repeat(ref_s, SIZES, axis=1) / 2 * SLACK
    err = np.abs(x.numpy() - rows.numpy())
    assert err.size == N * E == 37 * 16
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 0 and (err[:, 10:15] > 0).any(), "the spike's neighbours lose their values"
    np.testing.assert_array_equal(rows[:, 12].numpy(), np.full(N, -3e6, np.float32))

    check_read_paths(store, ref_x, FIELDS, SIZES)


def test_int8_rows_cost_four_bytes_per_field_plus_one_per_value(tmp_path):
    """A rank-32 sketch in int8 costs about what rank 16 costs in float32 (1024 + 4 vs 256 × 4 bytes)."""
    fields = [{"module": "m", "kind": "grad", "shape": [32, 32]}]
    w8 = LogWriter(tmp_path / "r32", fields, "int8")
    w32 = LogWriter(tmp_path / "r16", [{"module": "m", "kind": "grad", "shape": [16, 16]}], "float32")
    w8.write([0, 1], torch.randn(2, 1024))
    w32.write([0, 1], torch.randn(2, 256))
    w8.close()
    w32.close()
    assert (tmp_path / "r32" / "chunk_000000.bin").stat().st_size == 2 * (4 + 1024)
    assert (tmp_path / "r16" / "chunk_000000.bin").stat().st_size == 2 * 256 * 4


def test_int8_single_rows_read_back_when_a_row_is_not_a_multiple_of_four_bytes(tmp_path):
    """A row of 4 + 3 bytes: each single row (a one-row slice of the map keeps the 7-byte stride) reads
    back as q · scale."""
    w = LogWriter(tmp_path / "s", [{"module": "m", "kind": "grad", "shape": [3]}], "int8")
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3e-3, 1e-3, -127.0]])
    w.write([0, 1, 2], x)
    w.close()
    store = LogStore(tmp_path / "s")
    assert store.row_bytes == 7
    s = (np.abs(x.numpy()).max(1) / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint(x.numpy() / np.where(s > 0, s, 1)[:, None]), -127, 127)
    ref = q.astype(np.float32) * s[:, None]
    for i in range(3):
        np.testing.assert_array_equal(store.rows(i, i + 1).numpy(), ref[i : i + 1])
    np.testing.assert_array_equal(store.gather([2, 0]).numpy(), ref[[2, 0]])


def test_int8_refuses_non_finite_rows_naming_field_and_ids(tmp_path):
    w = LogWriter(tmp_path / "s", FIELDS, "int8")
    x = make_rows(4)
    x[2, 11] = float("nan")
    message = r"module 'spike' \(forward log\) for ids \['c'\]: an int8 store cannot hold NaN.*nothing of this batch"
    with pytest.raises(ValueError, match=message):
        w.write(["a", "b", "c", "d"], x)
    x[2, 11] = 1.0
    w.write(["a", "b", "c", "d"], x)  # the refused batch left nothing behind: its ids are still free
    w.close()
    assert LogStore(tmp_path / "s").ids == ["a", "b", "c", "d"]


def test_reopening_an_int8_store_with_another_dtype_is_refused(tmp_path):
    write_store(tmp_path / "s", make_rows(10))
    with pytest.raises(StoreError, match="different dtype .*stored 'int8', now 'float32'"):
        LogWriter(tmp_path / "s", FIELDS, "float32")
    with pytest.raises(ValueError, match=r"unknown storage dtype 'int3'.*'int8', 'int4', 'int2'"):
        LogWriter(tmp_path / "t", FIELDS, "int3")
    assert Config().update({"storage": {"dtype": "int8"}}).storage.dtype == "int8"
    assert Config().storage.dtype == "auto" and Config().store_dtype == "int8"  # the default for LoGra
    with pytest.raises(ValueError, match=r"storage.dtype.*'int8'"):
        Config().update({"storage": {"dtype": "uint8"}})


def test_verify_and_repair_of_an_int8_store(tmp_path, capsys):
    path = tmp_path / "s"
    write_store(path, make_rows())
    check_verify_flip_repair(path, N, 2, 0x01, reference(make_rows().numpy())[2], capsys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_rows_encoded_on_cuda_equal_the_formula(tmp_path):
    """Logs on the GPU are quantised there (only the int8 bytes cross to the CPU), bit for bit as the formula."""
    x = make_rows()
    logs = cuda_logs(x, FIELDS, SIZES)
    w = LogWriter(tmp_path / "s", FIELDS, "int8", flush_bytes=200)
    w.write_logs([f"ex{i}" for i in range(N)], logs)
    w.close()
    ref_s, ref_q, ref_x = reference(x.numpy())
    _, scales, q = on_disk(tmp_path / "s")
    np.testing.assert_array_equal(scales, ref_s)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(LogStore(tmp_path / "s").rows(0, N).numpy(), ref_x)
    assert q.size == N * E
