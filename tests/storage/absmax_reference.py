"""The absmax quantisation formula of int8/int4 stores (analog.storage.encoding), written out in numpy for
the storage tests: per row and field, s = max|x| / L (float32), q = clip(rint(x / s), −L, L), x̂ = q · s."""

import numpy as np


def absmax_reference(x: np.ndarray, sizes, levels: int):
    """(scales (n, F), q (n, E) int8, x̂ (n, E)) of rows ``x`` (n, E) split into fields of ``sizes``."""
    scales, qs, xhat = [], [], []
    offset = 0
    for size in sizes:
        xf = x[:, offset : offset + size]
        s = (np.abs(xf).max(1, initial=np.float32(0)) / np.float32(levels)).astype(np.float32)  # 0 if empty
        div = np.where(s > 0, s, np.float32(1)).astype(np.float32)  # an all-zero field: scale 0, q 0
        q = np.clip(np.rint(xf / div[:, None]), -levels, levels).astype(np.int8)
        scales.append(s)
        qs.append(q)
        xhat.append(q.astype(np.float32) * s[:, None])
        offset += size
    if not sizes:
        return np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int8), np.zeros((len(x), 0), np.float32)
    return np.stack(scales, 1), np.concatenate(qs, 1), np.concatenate(xhat, 1)


def reference_bytes(x: np.ndarray, sizes, levels: int) -> np.ndarray:
    """(n, row_bytes) uint8 rows of an int8 (levels 127) or int4 (levels 7) store, built by plain Python:
    the F scales' float32 little-endian bytes, then q as bytes (int8), or as nibbles q mod 16, value j
    of the row in byte j // 2, low nibble when j is even (int4)."""
    scales, q, _ = absmax_reference(x, sizes, levels)
    rows = []
    for s_row, q_row in zip(scales, q.tolist()):
        head = s_row.astype("<f4").tobytes()
        if levels == 127:
            body = bytes(v % 256 for v in q_row)
        else:
            packed = bytearray((len(q_row) + 1) // 2)
            for j, v in enumerate(q_row):
                packed[j // 2] |= (v % 16) << (4 * (j % 2))
            body = bytes(packed)
        rows.append(np.frombuffer(head + body, dtype=np.uint8))
    width = 4 * len(sizes) + (sum(sizes) if levels == 127 else (sum(sizes) + 1) // 2)
    return np.stack(rows) if rows else np.zeros((0, width), np.uint8)


def check_read_paths(store, ref_x: np.ndarray, fields, sizes) -> None:
    """Single rows, slices across chunk boundaries, gather, a batch (every field, by its offset) and the
    DataLoader read back exactly ``ref_x`` (n = 37 rows, the stores of the int8/int4 tests)."""
    import torch

    from analog.storage import build_log_dataloader

    compared = 0
    for start, stop in [(0, 1), (4, 13), (9, 31), (36, 37)]:
        np.testing.assert_array_equal(store.rows(start, stop).numpy(), ref_x[start:stop])
        compared += stop - start
    picks = [30, 2, 17, 17, 0]
    np.testing.assert_array_equal(store.gather(picks).numpy(), ref_x[picks])
    ids, logs = store.batch(5, 12)
    assert ids == [f"ex{i}" for i in range(5, 12)]
    offset = 0
    for field, size in zip(fields, sizes):
        got = logs[field["module"]][field["kind"]]
        assert got.shape == (7, *field["shape"])
        np.testing.assert_array_equal(got.reshape(7, -1).numpy(), ref_x[5:12, offset : offset + size])
        offset += size
    first = fields[0]
    batches = list(build_log_dataloader(store, batch_size=6, num_workers=0))
    got = torch.cat([b[1][first["module"]][first["kind"]].reshape(len(b[0]), -1) for b in batches])
    np.testing.assert_array_equal(got.numpy(), ref_x[:, : sizes[0]])
    assert compared == 1 + 9 + 22 + 1 and len(batches) == 7 and offset == ref_x.shape[1]
    # each field alone (its bytes only), across chunk boundaries: as float32, into a float64 out, by batch()
    offset = fields_read = 0
    for f, (field, size) in enumerate(zip(fields, sizes)):
        want = ref_x[9:31, offset : offset + size]
        np.testing.assert_array_equal(store.field_rows(9, 31, f).numpy(), want)
        out = torch.full((22, size), float("nan"), dtype=torch.float64)
        assert store.field_rows(9, 31, f, out=out) is out
        np.testing.assert_array_equal(out.numpy(), want.astype(np.float64))
        ids, logs = store.batch(9, 31, modules=[field["module"]], kinds=[field["kind"]])
        assert ids == [f"ex{i}" for i in range(9, 31)] and list(logs) == [field["module"]]
        assert list(logs[field["module"]]) == [field["kind"]]
        np.testing.assert_array_equal(logs[field["module"]][field["kind"]].reshape(22, -1).numpy(), want)
        offset += size
        fields_read += 1
    assert fields_read == len(fields) and offset == ref_x.shape[1]


def check_verify_flip_repair(path, n: int, flip_at: int, flip_mask: int, reference_rows: np.ndarray, capsys) -> None:
    """`analog store verify` passes on the store at ``path`` (n rows ``ex0..``), fails once byte ``flip_at`` of
    its second chunk is XOR-ed with ``flip_mask`` (reads refuse that chunk), and after `store repair` the store
    verifies again and holds exactly ``reference_rows`` of the ids it kept (some, not all)."""
    import pytest

    from analog.cli import main as cli
    from analog.storage import LogStore, StoreError

    assert cli(["store", "verify", str(path)]) == 0
    report = capsys.readouterr().out
    assert f"{n} examples" in report and "ok" in report
    chunk = path / "chunk_000001.bin"
    data = bytearray(chunk.read_bytes())
    data[flip_at] ^= flip_mask
    chunk.write_bytes(bytes(data))
    assert cli(["store", "verify", str(path)]) == 1
    assert "chunk_000001.bin does not match its checksum" in capsys.readouterr().out
    with pytest.raises(StoreError, match="chunk_000001.bin does not match the checksum"):
        LogStore(path).rows(0, n)
    assert cli(["store", "repair", str(path)]) == 0
    assert cli(["store", "verify", str(path)]) == 0
    store = LogStore(path)
    kept = [i for i in range(n) if f"ex{i}" in store.ids]
    assert 0 < len(kept) < n
    np.testing.assert_array_equal(store.rows(0, len(store)).numpy(), reference_rows[kept])


def cuda_logs(x, fields, sizes):
    """{module: {kind: (n, *shape) CUDA tensor}} of rows ``x`` (n, E) laid out as ``fields``."""
    logs = {f["module"]: {} for f in fields}
    offset = 0
    for f, size in zip(fields, sizes):
        logs[f["module"]][f["kind"]] = x[:, offset : offset + size].reshape(len(x), *f["shape"]).cuda()
        offset += size
    return logs
