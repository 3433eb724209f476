"""The ways rows reach an int8/int4 store's codec give the same bytes, those of the formula
(tests/storage/absmax_reference.py, built by plain Python): the writer's ``write_logs`` (packed into
its reused float32 staging buffer and quantised there in place), ``write`` (copied into that buffer;
the caller's rows untouched), the codec's ``encode`` (a copy) and ``encode(overwrite=True)``; over
odd and empty fields, all-zero fields and rows, subnormal scales, exact ties, inputs in other dtypes
or non-contiguous, and batch sizes that grow and shrink the staging buffer while earlier batches
still wait in the writer's buffer. int4 is checked with both of its packings (int16 byte pairs on
little-endian machines, byte by byte otherwise)."""

import numpy as np
import pytest
import torch
from absmax_reference import reference_bytes

from analog.storage import LogWriter, encoding
from analog.storage.encoding import row_codec
from analog.storage.rows import pack, split

LEVELS = {"int8": 127, "int4": 7}
SIZES = {
    "mlp-like": [64, 64, 10],  # unequal fields, as a LoGra MLP's (4096, 4096, 640 at rank 64)
    "odd": [9, 4, 5, 1],  # odd fields; int4 rows end mid-byte, fields start mid-byte
    "empty": [0, 7, 0, 3],  # empty fields: scale 0, no values
    "equal": [6, 6, 6],  # all fields the same size
    "one": [1],
}
KINDS = ["randn", "spread", "zeros", "subnormal", "ties", "bfloat16", "float64", "noncontig"]


def make_rows(kind: str, n: int, e: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, e, generator=gen)
    if kind == "spread":  # each row at its own magnitude, 1e-30 .. 1e30
        x = x * torch.logspace(-30, 30, max(n, 2))[:n, None]
    elif kind == "zeros":  # every other value 0, the first half of the rows all 0
        x[:, ::2] = 0.0
        x[: n // 2] = 0.0
    elif kind == "subnormal":  # multiples of 2⁻¹⁴⁹ up to ±m: subnormal scales, far from max / L, so q is clamped
        m = torch.tensor([10, 190, 900, 3, 12, 150])[torch.arange(n) % 6][:, None]
        x = (torch.rand(n, e, generator=gen) * (2 * m + 1) - m).round() * torch.tensor(2.0**-149)
    elif kind == "ties":  # halves: x / scale lands on .5 for some rows
        x = torch.randint(-14, 15, (n, e), generator=gen).float() / 2
    elif kind == "bfloat16":
        x = x.bfloat16()
    elif kind == "float64":
        x = x.double() * 1e3
    elif kind == "noncontig":
        x = torch.randn(e, n, generator=gen).t()
    return x


def fields_of_sizes(sizes):
    return [{"module": f"m{i}", "kind": "grad", "shape": [s]} for i, s in enumerate(sizes)]


def on_disk(path, row_bytes: int) -> np.ndarray:
    data = b"".join(p.read_bytes() for p in sorted(path.glob("chunk_*.bin")))
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, row_bytes)


@pytest.mark.parametrize("dtype", ["int8", "int4", "int4-strided"])
@pytest.mark.parametrize("layout", list(SIZES))
def test_every_path_to_the_codec_gives_the_formulas_bytes(tmp_path, monkeypatch, dtype, layout):
    if dtype == "int4-strided":  # the packing of big-endian machines (byte by byte, not int16 pairs)
        monkeypatch.setattr(encoding, "_LITTLE_ENDIAN", False)
        dtype = "int4"
    sizes = SIZES[layout]
    fields, e, levels = fields_of_sizes(sizes), sum(sizes), LEVELS[dtype]
    codec = row_codec(dtype, fields)
    batches = [5, 1, 8, 3, 0, 8, 2, 13, 4]  # the staging buffer grows (5, 8, 13) and is reused for fewer rows
    via_logs = LogWriter(tmp_path / "logs", fields, dtype, flush_bytes=10**9)  # one chunk: every batch buffered
    via_rows = LogWriter(tmp_path / "rows", fields, dtype, flush_bytes=3 * codec.row_bytes)
    expected, compared, n = [], 0, 0
    for b, (kind, size) in enumerate(zip(KINDS * 2, batches)):
        x = make_rows(kind, size, e, seed=b)
        ids = list(range(n, n + size))
        n += size
        ref = reference_bytes(x.to(torch.float32).numpy(), sizes, levels)
        expected.append(ref)
        kept = x.clone()
        np.testing.assert_array_equal(codec.encode(x).numpy(), ref)
        staged = x.to(torch.float32).contiguous().clone()
        np.testing.assert_array_equal(codec.encode(staged, overwrite=True).numpy(), ref)
        via_rows.write(ids, x)
        via_logs.write_logs(ids, split(x.to(torch.float32).contiguous(), fields))
        assert torch.equal(x, kept), "encode and write must not modify the caller's rows"
        compared += ref.size
    assert via_logs._staging is not None and len(via_logs._staging) == max(batches), "staged and reused"
    via_logs.close()
    via_rows.close()
    assert via_logs._staging is None, "close releases the staging buffer"
    expected = np.concatenate(expected)
    assert expected.shape == (sum(batches), codec.row_bytes)
    np.testing.assert_array_equal(on_disk(tmp_path / "logs", codec.row_bytes), expected)
    np.testing.assert_array_equal(on_disk(tmp_path / "rows", codec.row_bytes), expected)
    assert compared == expected.size and len(list((tmp_path / "logs").glob("chunk_*.bin"))) == 1


def test_subnormal_scales_need_the_clamp():
    """The case the clamp exists for: a subnormal scale is far from max/L, so x / scale exceeds L."""
    x = np.array([[190 * 2.0**-149, -190 * 2.0**-149, 2.0**-149]], dtype=np.float32)
    scale = np.float32(x[0, 0] / np.float32(127))
    assert 0 < scale < np.finfo(np.float32).tiny and abs(x[0, 0] / scale) > 127.5
    got = row_codec("int8", fields_of_sizes([3])).encode(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, reference_bytes(x, [3], 127))
    assert list(got[0, 4:].view(np.int8)) == [127, -127, 1]


def test_encode_overwrite_refuses_other_dtypes_and_pack_checks_its_out():
    fields = fields_of_sizes([3, 2])
    with pytest.raises(TypeError, match="int8 encode\\(overwrite=True\\) needs float32 rows"):
        row_codec("int8", fields).encode(torch.zeros(2, 5, dtype=torch.float64), overwrite=True)
    logs = split(torch.randn(4, 5), fields)
    with pytest.raises(ValueError, match=r"pack: out must be a contiguous \(4, 5\) torch.float32 tensor"):
        pack(logs, fields, torch.float32, out=torch.empty(3, 5))
    out = torch.empty(4, 5)
    assert pack(logs, fields, torch.float32, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.cat([logs["m0"]["grad"], logs["m1"]["grad"]], 1))


@pytest.mark.parametrize("levels", [127, 7])
def test_with_a_normal_scale_no_value_needs_the_clamp(levels):
    """Why encode clamps only where a scale is subnormal: for every normal scale = max / L (float32), the
    largest value divided by it rounds to at most L. Checked on 2·10⁶ random float32 maxima over the
    whole range and on every float32 within 2⁻¹⁰ of where max / L becomes subnormal."""
    rng = np.random.default_rng(levels)
    tiny = np.finfo(np.float32).tiny
    bits = rng.integers(1, 0x7F7FFFFF, 2_000_000, dtype=np.uint32)
    lo, hi = np.float32(levels * tiny * (1 - 2.0**-10)), np.float32(levels * tiny * (1 + 2.0**-10))
    edge = np.arange(lo.view(np.uint32), hi.view(np.uint32), dtype=np.uint32)
    m = torch.from_numpy(np.concatenate([bits, edge]).view(np.float32))
    scale = m / torch.full_like(m, float(levels))
    normal = scale >= tiny
    q = torch.round(m[normal] / scale[normal])
    assert int(normal.sum()) > 1_500_000 + len(edge) // 3 and len(edge) > 10_000
    assert float(q.max()) == levels and float(q.min()) >= levels - 1
    small = torch.arange(1, 2000, dtype=torch.float32) * torch.tensor(2.0**-149)  # k·2⁻¹⁴⁹: the clamp is needed
    small_scale = small / torch.full_like(small, float(levels))
    kept = small_scale > 0
    assert float(torch.round(small[kept] / small_scale[kept]).max()) > levels + 0.5
