"""int2 stores: each field rotated by a fixed randomised Hadamard transform R, then a per-row, per-field RMS
scale σ and 2-bit codes of the Gaussian Lloyd–Max quantiser, four a byte over the whole row
(analog.storage.encoding, analog.storage.rotation). The bytes on disk are parsed with numpy alone and
checked against a numpy reference of the formula (R formed densely from its definition) packed by a plain
Python loop; every read path returns Rᵀ(LEVEL[c] · σ); on Gaussian values, and on one-token gradients
(outer products) after the rotation, the mean squared error and the shrinkage are the quantiser's closed
forms."""

import json

import numpy as np
import pytest
import torch
from absmax_reference import check_read_paths, check_verify_flip_repair
from gauss2_reference import LEVELS, gauss2_decoded, gauss2_reference, pack_codes, rotation_matrix

from analog.storage import LogStore, LogWriter
from analog.storage.encoding import row_codec
from analog.storage.layout import StoreError
from analog.storage.rotation import Rotation
from analog.storage.writer import NonFiniteBatch

FIELDS = [
    {"module": "a", "kind": "grad", "shape": [2, 5]},  # mixed signs; 10 = 8 + 2: two Hadamard blocks
    {"module": "zero", "kind": "grad", "shape": [2]},  # all zero in every row: σ 0, reads 0; starts mid-byte
    {"module": "spike", "kind": "forward", "shape": [4]},  # one huge element: spread over the 4 values
    {"module": "one", "kind": "grad", "shape": [1]},  # a single value: R = ±1, |z| = 1, code ±b
]
SIZES = [10, 2, 4, 1]
F, E = len(FIELDS), sum(SIZES)  # E = 17: the last byte of each row holds one code and 6 zero bits
VALUE_BYTES = (E + 3) // 4
ROW = 4 * F + VALUE_BYTES
N, BATCH = 37, 5


def make_rows(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, E, generator=gen) * torch.logspace(-3, 2, n)[:, None]
    x[:, 10:12] = 0.0
    x[:, 12:16] = torch.rand(n, 4, generator=gen) * 1e-3
    x[:, 13] = -3e6
    x[:, 16] = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0) * torch.linspace(0.5, 7.0, n)
    return x


def write_store(path, x, flush_bytes=40):
    w = LogWriter(path, FIELDS, "int2", flush_bytes=flush_bytes)
    for start in range(0, len(x), BATCH):
        w.write([f"ex{i}" for i in range(start, min(start + BATCH, len(x)))], x[start : start + BATCH])
    w.close()


def on_disk(path):
    """(chunks, σ, packed bytes, codes) of every chunk, parsed with a numpy record layout and shifts."""
    record = np.dtype([("scale", "<f4", (F,)), ("v", "u1", (VALUE_BYTES,))])
    assert record.itemsize == ROW
    chunks = sorted(path.glob("chunk_*.bin"))
    parsed = [np.fromfile(c, dtype=record) for c in chunks]
    scales = np.concatenate([p["scale"] for p in parsed])
    packed = np.concatenate([p["v"] for p in parsed])
    codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], 2).reshape(len(packed), -1)
    assert (codes[:, E:] == 0).all(), "the unused bits of the last byte are 0"
    return chunks, scales, packed, codes[:, :E]


def test_int2_round_trip_equals_the_formula_on_disk_and_through_every_read(tmp_path):
    x = make_rows()
    write_store(tmp_path / "s", x)
    ref_s, ref_c, near = gauss2_reference(x.numpy(), SIZES)
    chunks, scales, packed, codes = on_disk(tmp_path / "s")
    assert len(chunks) >= 3, "flush_bytes should have split the rows into several chunks"
    assert sum(c.stat().st_size for c in chunks) == N * ROW == 37 * (16 + 5)
    assert LogStore(tmp_path / "s").header["rotation"] == "hadamard-v1"
    np.testing.assert_allclose(scales, ref_s, rtol=1e-5, atol=0)  # σ of R x = σ of x: R is orthogonal
    assert (scales[:, 1] == 0).all(), "an all-zero field has σ 0"
    far = ~near
    assert far.sum() >= N * E - 3, "a value may sit on a threshold only by accident"
    np.testing.assert_array_equal(codes[far], ref_c[far])
    np.testing.assert_array_equal(packed, pack_codes(codes))  # the plain-Python packing of the codes read
    assert np.isin(ref_c[:, 16], [0, 3]).all(), "a single value is ±σ: |z| = 1 > T"
    assert np.isin(ref_c[:, 12:16], [0, 3]).all(), "a spike spread by a 4-point Hadamard block: |z| = 1"
    assert set(np.unique(codes[:, :10]).tolist()) == {0, 1, 2, 3}

    expect = gauss2_decoded(codes, scales, SIZES)  # Rᵀ(level × σ), R formed densely
    store = LogStore(tmp_path / "s")
    assert store.row_bytes == ROW and store.torch_dtype == torch.float32
    rows = store.rows(0, N)
    assert rows.shape == (N, E)
    tol = 1e-6 * np.repeat(scales, SIZES, axis=1)  # float32 rounding of the rotation, relative to σ
    assert (np.abs(rows.numpy() - expect) <= tol).all()
    assert (rows[:, 10:12] == 0).all()
    spike = rows[:, 12:16].numpy()
    assert (np.abs(spike).argmax(1) == 1).all() and (np.abs(spike[:, 1] / -3e6 - 1.5104) < 1e-3).all(), \
        "the spike comes back in place, scaled by the level b = 1.5104 of its four ±σ rotated values"
    check_read_paths(store, rows.numpy(), FIELDS, SIZES)


def test_int2_on_gaussian_values_has_the_lloyd_max_error_and_shrinkage():
    """For z ~ N(0, 1): E(z − ẑ)² = 0.1175 and E[ẑ z] = E[ẑ²] = 0.8825 (the levels are centroids), so a
    score ⟨x̂, q⟩ with q unquantised is ≈ 0.88 ⟨x, q⟩; checked over 400 rows of 4,096 values."""
    codec = row_codec("int2", [{"module": "m", "kind": "grad", "shape": [64, 64]}])
    x = torch.randn(400, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float() * 3.0
    xhat = codec.decode(codec.encode(x).numpy())
    sigma = x.pow(2).mean(1, keepdim=True).sqrt()
    z, zhat = (x / sigma).double(), (xhat / sigma).double()
    assert z.numel() == 400 * 4096
    assert abs((z - zhat).pow(2).mean().item() - 0.1175) < 0.002
    assert abs((z * zhat).mean().item() - 0.8825) < 0.002 and abs(zhat.pow(2).mean().item() - 0.8825) < 0.002
    q = torch.randn(4096, generator=torch.Generator().manual_seed(2)).double() + 0.5 * x[0].double() / 3
    ratio = (xhat[0].double() @ q) / (x[0].double() @ q)
    assert 0.8 < ratio.item() < 0.96


def test_int2_rows_cost_four_bytes_per_field_plus_a_quarter_byte_per_value(tmp_path):
    """LoGra rank 64 in int2 costs about what rank 16 costs in float32 (4 + 1,024 vs 1,024 bytes a module)."""
    w = LogWriter(tmp_path / "r64", [{"module": "m", "kind": "grad", "shape": [64, 64]}], "int2")
    w.write([0, 1], torch.randn(2, 4096))
    w.close()
    assert LogStore(tmp_path / "r64").row_bytes == 4 + 1024
    assert sum(c.stat().st_size for c in (tmp_path / "r64").glob("chunk_*.bin")) == 2 * 1028
    empty = row_codec("int2", [{"module": "m", "kind": "grad", "shape": [0]}])
    assert empty.row_bytes == 4 and empty.decode(empty.encode(torch.zeros(3, 0)).numpy()).shape == (3, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int2_refuses_non_finite_rows_naming_module_and_ids(tmp_path, bad):
    x = make_rows(5)
    x[3, 12] = bad
    w = LogWriter(tmp_path / "s", FIELDS, "int2")
    with pytest.raises(NonFiniteBatch, match=r"'spike'.*\['ex3'\]"):
        w.write([f"ex{i}" for i in range(5)], x)
    w.close()
    assert len(LogStore(tmp_path / "s")) == 0, "the refused batch left nothing behind"


def test_int2_store_verify_flip_and_repair(tmp_path, capsys):
    x = make_rows()
    write_store(tmp_path / "s", x)
    expect = LogStore(tmp_path / "s").rows(0, N).numpy()
    check_verify_flip_repair(tmp_path / "s", N, flip_at=ROW + 16, flip_mask=0x04, reference_rows=expect,
                             capsys=capsys)


def test_int2_scale_of_huge_values_does_not_overflow():
    """Σx² of values near 1e25 overflows float32 (max 3.4e38), that of values near 1e-30 underflows to 0; σ is
    then taken as m·‖x/m‖/√n, and the codes
    are those of the float64 formula. A float64, non-contiguous input gives the same bytes as its float32
    contiguous copy."""
    fields = [{"module": "big", "kind": "grad", "shape": [6]}, {"module": "small", "kind": "grad", "shape": [3]}]
    codec = row_codec("int2", fields)
    x = torch.tensor([[1e25, -3e25, 2e24, -5e24, 4e25, 1e23, 0.1, -0.2, 0.3],
                      [1.0, -2.0, 0.5, 0.1, -0.3, 3.0, 1e-30, -2e-30, 0.0]], dtype=torch.float64)
    raw = codec.encode(x.T.contiguous().T).numpy()  # a transposed view: not contiguous
    np.testing.assert_array_equal(raw, codec.encode(x.float().contiguous()).numpy())
    sigma = raw[:, :8].copy().view(np.float32)
    ref_s, ref_c, near = gauss2_reference(x.float().numpy(), [6, 3])
    assert np.isfinite(sigma).all() and near.sum() <= 1
    np.testing.assert_allclose(sigma, ref_s, rtol=1e-5)
    codes = np.stack([(raw[:, 8:] >> s) & 3 for s in (0, 2, 4, 6)], 2).reshape(2, -1)[:, :9]
    np.testing.assert_array_equal(codes[~near], ref_c[~near])
    out = codec.decode(raw).numpy()
    expect = gauss2_decoded(codes, sigma, [6, 3])
    assert out.size == 18 and np.isfinite(out).all()
    assert (np.abs(out - expect) <= 1e-6 * np.repeat(sigma, [6, 3], axis=1)).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 17, 64, 100, 257, 1440])
def test_int2_rotation_is_the_randomised_hadamard_transform_of_its_definition(n):
    """analog's factored R (Hadamard factors of 16 along a reshape) equals the dense R built from the
    definition (splitmix64, the sorted permutation, (−1)^popcount(i AND j) blocks), is orthogonal, and
    its inverse undoes it, for sizes with one block (powers of two) and several."""
    rotation = Rotation(n)
    eye = torch.eye(n, dtype=torch.float64)
    dense = rotation_matrix(n)
    np.testing.assert_allclose(rotation.forward(eye).T.numpy(), dense, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dense.T @ dense, np.eye(n), rtol=0, atol=1e-12)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    np.testing.assert_allclose(rotation.inverse(rotation.forward(x)).numpy(), x.numpy(), rtol=0, atol=1e-12)
    assert dense.shape == (n, n)


def test_int2_keeps_one_token_gradients_as_well_as_gaussian_values():
    """A one-token example's LoGra sketch is an outer product u vᵀ (heavy-tailed entries): coded without the
    rotation its mean squared error is twice the Gaussian 0.1175 σ², and scores ⟨x̂, q⟩ drift; rotated, the
    error is the Gaussian one and scores keep a correlation ≥ 0.92 with the exact ones (200 rows, 50
    queries of the same kind; the unrotated code, formed here in numpy, stays below 0.9)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 64, 1, generator=gen) * torch.randn(200, 1, 64, generator=gen)).reshape(200, 4096)
    q = (torch.randn(50, 64, 1, generator=gen) * torch.randn(50, 1, 64, generator=gen)).reshape(50, 4096)
    codec = row_codec("int2", [{"module": "m", "kind": "grad", "shape": [64, 64]}])
    rotated = codec.decode(codec.encode(x).numpy())
    sigma = x.pow(2).mean(1, keepdim=True).sqrt()
    z = x / sigma
    plain = torch.from_numpy(LEVELS)[(z >= -0.9816).long() + (z >= 0).long() + (z >= 0.9816).long()] * sigma

    def relative_mse(xhat):
        return ((xhat - x).pow(2).sum(1) / x.pow(2).sum(1)).mean().item()

    def score_corr(xhat):
        return float(np.corrcoef((xhat @ q.T).flatten(), (x @ q.T).flatten())[0, 1])

    assert abs(relative_mse(rotated) - 0.1175) < 0.004 and relative_mse(plain) > 0.2
    assert score_corr(rotated) >= 0.92 and score_corr(plain) < 0.9
    assert rotated.shape == plain.shape == (200, 4096)


def test_int2_store_written_without_the_rotation_is_refused_not_misread(tmp_path):
    """A store.json with dtype int2 but no "rotation" (an earlier analog's unrotated codes) is refused by
    readers and writers, naming the file and what to do; the rows are left as they were."""
    x = make_rows()
    write_store(tmp_path / "s", x)
    header_file = tmp_path / "s" / "store.json"
    header = json.loads(header_file.read_text())
    del header["rotation"]
    header_file.write_text(json.dumps(header))
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "s").iterdir())
    with pytest.raises(StoreError, match=r"store.json.*'rotation'.*not rotated.*log it again"):
        LogStore(tmp_path / "s")
    with pytest.raises(StoreError, match=r"store.json.*'rotation'"):
        LogWriter(tmp_path / "s", FIELDS, "int2")
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "s").iterdir()) == before
