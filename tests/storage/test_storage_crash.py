"""Crash safety: a logging process killed with SIGKILL leaves a store whose completed chunks all
read back, and which a new run can append to; a half-written chunk is ignored, then replaced."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import torch
from torch import nn

from analog import AnaLog
from analog.storage import LogStore, LogWriter

BATCH = 8
COMMON = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def make_batch(ids):
        # each example is a deterministic function of its id
        k = torch.tensor(ids, dtype=torch.float32)[:, None]
        return torch.sin(k * 0.37 + torch.arange(6) * 1.3), torch.tensor(ids) % 3

    def config(root):
        # float32: the rows are compared with recomputed gradients to 1e-5, and flush_bytes makes a chunk
        # every two batches of 128-byte rows (int8 kills and appends: test_storage_recovery.py)
        return {"root_dir": root, "compression": {"rank": 4}, "storage": {"dtype": "float32", "flush_bytes": 2048}}
""")
_helpers: dict = {}
exec(COMMON, _helpers)  # the same helpers in this process and in the child
make_model = _helpers["make_model"]
make_batch = _helpers["make_batch"]
config = _helpers["config"]

CHILD = COMMON + textwrap.dedent("""
    import sys
    from analog import AnaLog
    torch.set_num_threads(1)
    model = make_model()
    run = AnaLog("crash", config(sys.argv[1]))
    run.watch(model)
    i = 0
    while True:                      # logs until killed
        ids = list(range(i, i + 8))
        x, y = make_batch(ids)
        with run(data_id=ids):
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad()
        i += 8
        if i == 8 * 12:
            print("ready", flush=True)
""")


def expected_logs(root, ids):
    """The per-module gradients of ``ids``, recomputed in this process without saving."""
    model = make_model()
    run = AnaLog("check", {**config(str(root)), "save": False})
    run.watch(model)
    out = {}
    for s in range(0, len(ids), BATCH):
        batch = ids[s:s + BATCH]
        x, y = make_batch(batch)
        with run(data_id=batch):
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad()
        for m, kinds in run.get_log()[1].items():
            out.setdefault(m, []).append(kinds["grad"].clone())
    return {m: torch.cat(v) for m, v in out.items()}


def leftovers(path):
    bins = {p.stem for p in path.glob("chunk_*.bin")}
    jsons = {p.stem for p in path.glob("chunk_*.json")}
    return sorted(bins - jsons) + sorted(p.name for p in path.glob("*.tmp"))


def test_sigkill_mid_logging_then_read_and_append(tmp_path):
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line
        time.sleep(0.05)
        assert proc.poll() is None, "the child must still be logging when it is killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    log_path = root / "crash" / "logs"

    store = LogStore(log_path)
    n = len(store)
    assert n >= 8 * 12 - 3 * BATCH, "every chunk completed before the kill must be readable"
    assert store.ids == list(range(n)), "completed chunks hold whole batches, in order"
    ids, logs = store.batch(0, n)
    want = expected_logs(tmp_path, ids)
    assert set(logs) == set(want) == {"0", "2"}
    for m in want:
        torch.testing.assert_close(logs[m]["grad"], want[m], rtol=1e-5, atol=1e-6)

    # a new run (same project and config) appends after the completed chunks
    model = make_model()
    run = AnaLog("crash", config(str(root)))
    run.watch(model)
    new_ids = list(range(n, n + 24))
    for s in range(0, 24, BATCH):
        x, y = make_batch(new_ids[s:s + BATCH])
        with run(data_id=new_ids[s:s + BATCH]):
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad()
    run.finalize()
    assert leftovers(log_path) == [], "the killed run's partial files are cleaned up by the next writer"
    store = LogStore(log_path)
    assert store.ids == list(range(n + 24))
    ids, logs = next(iter(run.build_log_dataloader(batch_size=n + 24)))
    want = expected_logs(tmp_path, ids)
    for m in want:
        torch.testing.assert_close(logs[m]["grad"], want[m], rtol=1e-5, atol=1e-6)


def _log(run, model, ids):
    x, y = make_batch(ids)
    with run(data_id=ids):
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad()


def test_orphan_chunk_data_is_ignored_then_replaced(tmp_path):
    fields = [{"module": "m", "kind": "grad", "shape": [4]}]
    path = tmp_path / "s"
    w = LogWriter(path, fields, flush_bytes=64)
    for s in range(0, 24, 4):
        w.write(list(range(s, s + 4)), torch.arange(s, s + 4, dtype=torch.float32)[:, None].repeat(1, 4))
    w.close()
    last = max(int(p.stem.split("_")[1]) for p in path.glob("chunk_*.json"))
    assert last >= 2
    # what a writer killed mid-chunk leaves: data with no metadata, a temporary metadata file
    (path / f"chunk_{last + 1:06d}.bin").write_bytes(b"\x7f" * 1000)
    (path / f"chunk_{last + 1:06d}.json.tmp").write_text('{"n": 3, "ids": [1')
    (path / f"chunk_{last + 2:06d}.bin").write_bytes(b"")

    store = LogStore(path)
    assert store.ids == list(range(24))
    assert torch.equal(store.rows(0, 24)[:, 0], torch.arange(24, dtype=torch.float32))

    w = LogWriter(path, fields, flush_bytes=64)
    assert leftovers(path) == [], "the next writer removes the partial files"
    w.write(list(range(24, 28)), torch.full((4, 4), -1.0))
    w.close()
    assert leftovers(path) == []
    replaced = path / f"chunk_{last + 1:06d}.json"
    assert json.loads(replaced.read_text())["ids"] == list(range(24, 28))
    store = LogStore(path)
    assert store.ids == list(range(28))
    assert torch.equal(store.rows(24, 28), torch.full((4, 4), -1.0))


def test_second_writer_on_the_same_store_is_refused_until_the_first_finalizes(tmp_path):
    model = make_model()
    first = AnaLog("p", config(str(tmp_path)))
    first.watch(model)
    _log(first, model, list(range(8)))
    second = AnaLog("p", config(str(tmp_path)))
    second.watch(model)
    try:
        _log(second, model, list(range(8, 16)))
        raise AssertionError("two writers appended to one store at once")
    except Exception as e:
        assert "another writer" in str(e) and str(first.log_path) in str(e)
    first.finalize()
    _log(second, model, list(range(8, 16)))
    second.finalize()
    assert LogStore(first.log_path).ids == list(range(16))


def test_lock_is_released_even_if_a_forked_process_still_holds_the_file(tmp_path):
    """DataLoader workers forked while a writer is open share its lock file; closing must still unlock."""
    fields = [{"module": "m", "kind": "grad", "shape": [2]}]
    w = LogWriter(tmp_path / "s", fields)
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: keep the inherited descriptors open until told to go
        os.close(wfd)
        os.read(r, 1)
        os._exit(0)
    try:
        os.close(r)
        w.write([0], torch.zeros(1, 2))
        w.close()
        again = LogWriter(tmp_path / "s", fields)  # while the child is still alive
        again.close()
    finally:
        os.write(wfd, b"x")
        os.close(wfd)
        os.waitpid(pid, 0)
    assert LogStore(tmp_path / "s").ids == [0]
