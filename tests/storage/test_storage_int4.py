"""int4 stores: per-row, per-field absmax quantisation to [-7, 7], two 4-bit two's complement values a
byte, low nibble first, packed over the whole row (analog.storage.encoding). The bytes on disk are
checked against a numpy reference of the formula packed by a plain Python loop, and parsed back with
numpy alone; every read path is checked against q · scale."""

import numpy as np
import pytest
import torch
from absmax_reference import absmax_reference, check_read_paths, check_verify_flip_repair, cuda_logs

from analog.storage import LogStore, LogWriter, StoreError

FIELDS = [
    {"module": "a", "kind": "grad", "shape": [3, 3]},  # mixed signs, odd size; row 0 holds exact ties
    {"module": "zero", "kind": "grad", "shape": [4]},  # all zero in every row; starts mid-byte (value 9)
    {"module": "spike", "kind": "forward", "shape": [5]},  # one huge element among small ones; starts mid-byte
    {"module": "one", "kind": "grad", "shape": [1]},  # a single value: q = ±7
]
SIZES = [9, 4, 5, 1]
F, E = len(FIELDS), sum(SIZES)  # E = 19: the last byte of each row holds one value and a zero pad nibble
VALUE_BYTES = (E + 1) // 2
ROW = 4 * F + VALUE_BYTES
N, BATCH = 37, 5
#: |x − x̂| ≤ scale/2 exactly; float32's division and product add at most 4·7·2⁻²⁴ < 2⁻¹⁹ of it
SLACK = 1 + 2.0**-19
TIES = [7.0, 2.5, 3.5, -0.5, -1.5, -6.5, 0.5, 1.5, 4.5]  # scale 1: round half to even gives 2, 4, -0, -2, -6, 0, 2, 4


def make_rows(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, E, generator=gen) * torch.logspace(-3, 2, n)[:, None]
    x[0, :9] = torch.tensor(TIES)
    x[3, :9] = 0.0  # field "a" of row 3 is all zero as well
    x[:, 9:13] = 0.0
    x[:, 13:18] = torch.rand(n, 5, generator=gen) * 1e-3
    x[:, 15] = -3e6  # the spike: every other value of its field quantises to 0
    x[:, 18] = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0) * torch.linspace(0.5, 7.0, n)
    return x


def reference(x: np.ndarray):
    """(scales (n, F), q (n, E) int8, x̂ (n, E)) by the formula, in float32 numpy (L = 7)."""
    return absmax_reference(x, SIZES, 7)


def packed_reference(q: np.ndarray) -> np.ndarray:
    """(n, ceil(E/2)) uint8: value j of a row in byte j // 2, low nibble if j is even, as q mod 16."""
    out = np.zeros((len(q), VALUE_BYTES), dtype=np.uint8)
    for r, row in enumerate(q.tolist()):
        for j, v in enumerate(row):
            out[r, j // 2] |= (v % 16) << (4 * (j % 2))
    return out


def write_store(path, x, flush_bytes=100, dtype="int4"):
    w = LogWriter(path, FIELDS, dtype, flush_bytes=flush_bytes)
    for start in range(0, len(x), BATCH):
        w.write([f"ex{i}" for i in range(start, min(start + BATCH, len(x)))], x[start : start + BATCH])
    w.close()


def on_disk(path):
    """(chunks, scales, packed bytes, q) of every chunk, parsed with a numpy record layout and
    numpy nibble arithmetic (not analog's reader)."""
    record = np.dtype([("scale", "<f4", (F,)), ("v", "u1", (VALUE_BYTES,))])
    assert record.itemsize == ROW
    chunks = sorted(path.glob("chunk_*.bin"))
    parsed = [np.fromfile(c, dtype=record) for c in chunks]
    scales = np.concatenate([p["scale"] for p in parsed])
    packed = np.concatenate([p["v"] for p in parsed])
    nibbles = np.stack([packed & 0x0F, packed >> 4], 2).reshape(len(packed), -1).astype(np.int16)
    assert (nibbles[:, E:] == 0).all(), "the pad nibble of an odd row is 0"
    assert not (nibbles == 8).any(), "-8 is never written"
    q = np.where(nibbles >= 8, nibbles - 16, nibbles)[:, :E]
    return chunks, scales, packed, q


def test_int4_round_trip_equals_the_formula_on_disk_and_through_every_read(tmp_path):
    x = make_rows()
    write_store(tmp_path / "s", x)
    ref_s, ref_q, ref_x = reference(x.numpy())
    assert (ref_s[:, 1] == 0).all() and (ref_s[3, :1] == 0).all(), "all-zero fields have scale 0"
    assert (np.abs(ref_q[:, 18]) == 7).all() and (ref_q[:, 13:18] == 0).sum() == N * 4
    assert ref_q[0, :9].tolist() == [7, 2, 4, 0, -2, -6, 0, 2, 4], "ties round half to even"
    assert (ref_q < 0).sum() > N * 3 and ref_q.min() == -7 and ref_q.max() == 7

    chunks, scales, packed, q = on_disk(tmp_path / "s")
    assert len(chunks) >= 3, "flush_bytes should have split the rows into several chunks"
    sizes = [c.stat().st_size for c in chunks]
    assert sum(sizes) == N * ROW == 37 * (16 + 10) and all(s % ROW == 0 for s in sizes)
    np.testing.assert_array_equal(scales, ref_s)
    np.testing.assert_array_equal(packed, packed_reference(ref_q))
    np.testing.assert_array_equal(q, ref_q)
    assert q.size == N * E

    store = LogStore(tmp_path / "s")
    assert store.row_bytes == ROW and store.torch_dtype == torch.float32
    rows = store.rows(0, N)
    assert rows.dtype == torch.float32 and rows.shape == (N, E)
    np.testing.assert_array_equal(rows.numpy(), ref_x)
    # the bound, elementwise, with each element's own field scale
    half = np.repeat(ref_s, SIZES, axis=1) / 2
    err = np.abs(x.numpy() - rows.numpy())
    assert err.size == N * E == 37 * 19
    assert (err <= half * SLACK).all(), float((err - half * SLACK).max())
    assert (err[half > 0] / half[half > 0]).max() > 0.9, "some values lose nearly the whole half step"
    assert (err[:, 13:18] > 0).any(), "the spike's neighbours lose their values"
    np.testing.assert_array_equal(rows[:, 15].numpy(), np.full(N, -3e6, np.float32))
    check_read_paths(store, ref_x, FIELDS, SIZES)



def test_int4_rows_cost_four_bytes_per_field_plus_half_a_byte_per_value(tmp_path):
    """A rank-45 sketch in int4 costs about what rank 16 costs in float32 (4 + 1013 vs 256 × 4 bytes)."""
    w4 = LogWriter(tmp_path / "r45", [{"module": "m", "kind": "grad", "shape": [45, 45]}], "int4")
    w32 = LogWriter(tmp_path / "r16", [{"module": "m", "kind": "grad", "shape": [16, 16]}], "float32")
    w4.write([0, 1], torch.randn(2, 2025))
    w32.write([0, 1], torch.randn(2, 256))
    w4.close()
    w32.close()
    assert (tmp_path / "r45" / "chunk_000000.bin").stat().st_size == 2 * (4 + 1013)
    assert (tmp_path / "r16" / "chunk_000000.bin").stat().st_size == 2 * 256 * 4


def test_int4_refuses_non_finite_rows_naming_field_and_ids(tmp_path):
    w = LogWriter(tmp_path / "s", FIELDS, "int4")
    x = make_rows(4)
    x[2, 14] = float("inf")
    message = r"module 'spike' \(forward log\) for ids \['c'\]: an int4 store cannot hold NaN.*nothing of this batch"
    with pytest.raises(ValueError, match=message):
        w.write(["a", "b", "c", "d"], x)
    x[2, 14] = 1.0
    w.write(["a", "b", "c", "d"], x)  # the refused batch left nothing behind: its ids are still free
    w.close()
    assert LogStore(tmp_path / "s").ids == ["a", "b", "c", "d"]


def test_reopening_an_int4_store_with_another_dtype_is_refused(tmp_path):
    write_store(tmp_path / "s", make_rows(10))
    with pytest.raises(StoreError, match="different dtype .*stored 'int4', now 'int8'"):
        LogWriter(tmp_path / "s", FIELDS, "int8")
    write_store(tmp_path / "t", make_rows(10), dtype="int8")
    with pytest.raises(StoreError, match="different dtype .*stored 'int8', now 'int4'"):
        LogWriter(tmp_path / "t", FIELDS, "int4")


def test_verify_and_repair_of_an_int4_store(tmp_path, capsys):
    path = tmp_path / "s"
    write_store(path, make_rows())
    check_verify_flip_repair(path, N, 4 * F, 0x10, reference(make_rows().numpy())[2], capsys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int4_rows_encoded_on_cuda_equal_the_formula(tmp_path):
    """Logs on the GPU are quantised and packed there (only the int4 bytes cross to the CPU), bit for bit."""
    x = make_rows()
    logs = cuda_logs(x, FIELDS, SIZES)
    w = LogWriter(tmp_path / "s", FIELDS, "int4", flush_bytes=100)
    w.write_logs([f"ex{i}" for i in range(N)], logs)
    w.close()
    ref_s, ref_q, ref_x = reference(x.numpy())
    _, scales, packed, q = on_disk(tmp_path / "s")
    np.testing.assert_array_equal(scales, ref_s)
    np.testing.assert_array_equal(packed, packed_reference(ref_q))
    np.testing.assert_array_equal(LogStore(tmp_path / "s").rows(0, N).numpy(), ref_x)
    assert q.size == N * E
