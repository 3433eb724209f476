"""Every way a store can be missing, damaged or misused is a clear error naming the file or id,
and a failure of the background writer surfaces in the training process."""

import json
import shutil

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.storage import LogStore, LogWriter, StoreError

FIELDS = [{"module": "m", "kind": "grad", "shape": [2, 3]}]


def make_store(path, n_chunks=3, rows=4):
    w = LogWriter(path, FIELDS, flush_bytes=1)
    for c in range(n_chunks):
        ids = list(range(c * rows, (c + 1) * rows))
        w.write(ids, torch.tensor(ids, dtype=torch.float32)[:, None].repeat(1, 6))
    w.close()
    assert len(LogStore(path)) == n_chunks * rows
    return path


# -- reading a damaged store -------------------------------------------------------------------
def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no log store.*store.json"):
        LogStore(tmp_path / "nothing")
    run = AnaLog("p", {"root_dir": str(tmp_path)})
    run.watch(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(StoreError, match=r"p/logs.*save=True"):
        run.build_log_dataloader(4)


@pytest.mark.parametrize("content,match", [
    (None, "corrupt or truncated"),          # truncated in the middle
    ("", "corrupt or truncated"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": 1}', "dtype"),
    ("garbage\x00\xff", "corrupt or truncated"),
])
def test_corrupt_store_json(tmp_path, content, match):
    path = make_store(tmp_path / "s")
    header = path / "store.json"
    text = header.read_text()
    header.write_text(text[: len(text) // 2] if content is None else content)
    with pytest.raises(StoreError, match=match) as e:
        LogStore(path)
    assert str(header) in str(e.value)
    with pytest.raises(StoreError, match="store.json"):
        LogWriter(path, FIELDS)  # nor can a writer append to it


def test_store_json_that_is_a_directory(tmp_path):
    path = make_store(tmp_path / "s")
    (path / "store.json").unlink()
    (path / "store.json").mkdir()
    with pytest.raises(StoreError, match="cannot read metadata file .*store.json"):
        LogStore(path)


def test_header_with_inconsistent_fields(tmp_path):
    path = make_store(tmp_path / "s")
    header = json.loads((path / "store.json").read_text())
    header["row_elems"] = 7
    (path / "store.json").write_text(json.dumps(header))
    with pytest.raises(StoreError, match="row_elems"):
        LogStore(path)


@pytest.mark.parametrize("damage,match,victim", [
    ("truncate_json", "corrupt or truncated", "chunk_000001.json"),
    ("json_no_n", "corrupt chunk metadata", "chunk_000001.json"),
    ("json_ids_count", "3 ids for n=4", "chunk_000001.json"),
    ("missing_bin", "missing chunk data file", "chunk_000001.bin"),
    ("short_bin", "has 95 bytes, expected 96", "chunk_000001.bin"),
    ("long_bin", "has 97 bytes, expected 96", "chunk_000001.bin"),
])
def test_damaged_chunk(tmp_path, damage, match, victim):
    path = make_store(tmp_path / "s")
    meta, data = path / "chunk_000001.json", path / "chunk_000001.bin"
    if damage == "truncate_json":
        meta.write_text(meta.read_text()[:10])
    elif damage == "json_no_n":
        meta.write_text(json.dumps({"ids": [4, 5, 6, 7]}))
    elif damage == "json_ids_count":
        meta.write_text(json.dumps({"n": 4, "ids": [4, 5, 6]}))
    elif damage == "missing_bin":
        data.unlink()
    elif damage == "short_bin":
        data.write_bytes(data.read_bytes()[:-1])
    elif damage == "long_bin":
        data.write_bytes(data.read_bytes() + b"\x00")
    with pytest.raises(StoreError, match=match) as e:
        LogStore(path)
    assert str(path / victim) in str(e.value)
    with pytest.raises(StoreError, match=victim):
        LogWriter(path, FIELDS)  # appending to a damaged store is refused too


def test_reader_expectations(tmp_path):
    path = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="different fields"):
        LogStore(path, expect_fields=[{"module": "m", "kind": "grad", "shape": [6]}])
    with pytest.raises(StoreError, match="different compression"):
        LogStore(path, expect_compression={"kind": "logra", "seed": 1})
    with pytest.raises(StoreError, match=r"module\(s\) \['m'\]"):
        LogStore(path, expect_modules=["other"])
    assert len(LogStore(path, expect_modules=["m", "frozen"])) == 12


def test_writer_refuses_a_store_of_another_layout(tmp_path):
    path = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="different fields"):
        LogWriter(path, [{"module": "m", "kind": "grad", "shape": [6]}])
    with pytest.raises(StoreError, match="different dtype"):
        LogWriter(path, FIELDS, dtype="float16")
    with pytest.raises(StoreError, match="different compression"):
        LogWriter(path, FIELDS, fingerprint={"seed": 3})
    w = LogWriter(path, FIELDS)  # the refused writers released the lock
    w.close()


# -- ids ----------------------------------------------------------------------------------------
def test_duplicate_ids_name_the_id_and_store_nothing_of_the_batch(tmp_path):
    path = make_store(tmp_path / "s", n_chunks=1)
    w = LogWriter(path, FIELDS, flush_bytes=1)
    with pytest.raises(ValueError, match="id 2 is already in store"):
        w.write([10, 11, 2], torch.zeros(3, 6))
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        w.write(["a", 12, "a"], torch.zeros(3, 6))
    w.write([10, 11, 12, "a"], torch.ones(4, 6))  # the refused batches left no trace
    with pytest.raises(ValueError, match="id 'a' is already"):
        w.write(["a"], torch.zeros(1, 6))
    w.close()
    store = LogStore(path)
    assert store.ids == [0, 1, 2, 3, 10, 11, 12, "a"]
    assert torch.equal(store.rows(4, 8), torch.ones(4, 6))


def test_rows_of_the_wrong_shape(tmp_path):
    w = LogWriter(tmp_path / "s", FIELDS)
    with pytest.raises(ValueError, match="rows of shape"):
        w.write([1, 2], torch.zeros(3, 6))
    w.close()
    with pytest.raises(StoreError, match="closed"):
        w.write([1], torch.zeros(1, 6))


# -- failures of the background writer ---------------------------------------------------------
def _model_and_run(root):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    run = AnaLog("p", {"root_dir": str(root), "compression": {"rank": 2}, "storage": {"flush_bytes": 256}})
    run.watch(model)
    return model, run


def _step(run, model, ids):
    with run(data_id=ids):
        model(torch.randn(len(ids), 4)).pow(2).sum().backward()
    model.zero_grad()


@pytest.mark.parametrize("fault", ["dir_replaced_by_file", "dir_removed"])
def test_writer_failure_surfaces_at_the_next_call(tmp_path, fault):
    model, run = _model_and_run(tmp_path)
    for s in range(0, 32, 8):
        _step(run, model, list(range(s, s + 8)))
    log_path = run.log_path
    assert list(log_path.glob("chunk_*.json")), "some chunks are on disk before the fault"
    # pull the store out from under the writer thread
    shutil.move(str(log_path), str(tmp_path / "moved"))
    if fault == "dir_replaced_by_file":
        log_path.write_text("not a directory")
    raised = None
    for s in range(32, 32 + 8 * 6, 8):
        try:
            _step(run, model, list(range(s, s + 8)))
        except StoreError as e:
            raised = e
            break
    assert raised is not None, "a failed chunk write must surface in the training process"
    assert str(log_path) in str(raised) and "failed" in str(raised)
    assert isinstance(raised.__cause__, OSError)
    # it keeps surfacing: more logging, and finalize, are errors too — never silently dropped
    with pytest.raises(StoreError, match="failed"):
        _step(run, model, [1000, 1001])
    with pytest.raises(StoreError, match="failed"):
        run.finalize()
    with pytest.raises(StoreError, match="failed"):
        run.finalize()


def test_writer_failure_surfaces_at_finalize(tmp_path):
    model, run = _model_and_run(tmp_path)
    run.config.storage.flush_bytes = 10**9
    _step(run, model, [0, 1])  # opens the writer; the batch stays in the buffer
    shutil.rmtree(run.log_path)
    with pytest.raises(StoreError, match="failed") as e:
        run.finalize()
    assert isinstance(e.value.__cause__, FileNotFoundError)
