"""Integrity: checksums verified on read, gaps and lost metadata named, links refused, temporary
files never written through links; `analog store verify` / `repair`; and a repaired project refits
to the curvature of exactly the rows that remain."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.cli import main as cli
from analog.storage import LogStore, StoreError

BATCH = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _config(root, hessian="kfac"):
    # float32 rows: 4 examples × 8 values × 4 bytes = 128 bytes a batch, one chunk per batch (the chunk
    # layout and the flipped offsets below assume it; int8 verify/repair: test_storage_int8.py)
    return {"root_dir": str(root), "hessian": hessian, "compression": {"rank": 2},
            "storage": {"dtype": "float32", "flush_bytes": 100}}


def _log(run, model, batches):
    for b in batches:
        ids = list(range(b * BATCH, (b + 1) * BATCH))
        x = torch.sin(torch.tensor(ids, dtype=torch.float32)[:, None] * 0.7 + torch.arange(5.0))
        with run(data_id=ids):
            nn.functional.cross_entropy(model(x), torch.tensor(ids) % 3, reduction="sum").backward()
        model.zero_grad()


def _project(root, name="p", batches=range(5), hessian="kfac"):
    model = _model()
    run = AnaLog(name, _config(root, hessian)).watch(model)
    _log(run, model, batches)
    run.finalize()
    return run


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_an_error_naming_the_chunk_and_the_fast_path_skips_the_check(tmp_path):
    run = _project(tmp_path)
    chunk = run.log_path / "chunk_000002.bin"
    _flip(chunk, 5)
    store = LogStore(run.log_path)
    store.rows(0, 2 * BATCH)  # chunks 0 and 1 are sound
    with pytest.raises(StoreError, match=f"{chunk} does not match the checksum in chunk_000002.json"):
        store.rows(2 * BATCH, 2 * BATCH + 1)
    trusted = LogStore(run.log_path, verify=False)  # documented fast path: no checksum
    assert trusted.rows(0, 5 * BATCH).shape == (5 * BATCH, 8)


def test_nan_bytes_written_over_a_chunk_are_caught(tmp_path):
    run = _project(tmp_path)
    chunk = run.log_path / "chunk_000001.bin"
    data = bytearray(chunk.read_bytes())
    data[8:16] = np.array([np.nan, np.nan], dtype=np.float32).tobytes()
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="chunk_000001.bin does not match the checksum"):
        list(run.build_log_dataloader(batch_size=3))


def test_lost_metadata_in_the_middle_is_named_and_its_ids_cannot_be_logged_again(tmp_path):
    run = _project(tmp_path)
    (run.log_path / "chunk_000001.json").unlink()
    with pytest.raises(StoreError, match="chunk_000001.json is missing but later chunks of rank 0 exist "
                                         r"\(chunk_000001.bin is there: its rows lost their ids\)"):
        LogStore(run.log_path)
    model = _model()
    again = AnaLog("p", _config(tmp_path)).watch(model)
    again.curvature.meta["finalized"] = False  # even a process allowed to log cannot append
    with pytest.raises(StoreError, match="chunk_000001.json is missing.*analog store repair"):
        _log(again, model, [1])


def test_lost_metadata_of_the_last_chunk_reads_as_a_killed_write(tmp_path):
    run = _project(tmp_path)
    (run.log_path / "chunk_000004.json").unlink()  # indistinguishable from a kill before the commit
    store = LogStore(run.log_path)
    assert len(store) == 4 * BATCH and store.ids == list(range(4 * BATCH))


def test_a_chunk_replaced_by_a_link_is_refused(tmp_path):
    run = _project(tmp_path)
    other = tmp_path / "other.bin"
    other.write_bytes((run.log_path / "chunk_000000.bin").read_bytes())
    (run.log_path / "chunk_000000.bin").unlink()
    os.symlink(other, run.log_path / "chunk_000000.bin")
    with pytest.raises(StoreError, match="chunk_000000.bin is a symbolic link"):
        LogStore(run.log_path)


def test_temporary_files_are_never_written_through_links(tmp_path):
    model = _model()
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    state = tmp_path / "p" / "state"
    logs = tmp_path / "p" / "logs"
    state.mkdir(parents=True)
    logs.mkdir(parents=True)
    links = [state / "config.json.tmp", state / "curvature.json.tmp", state / "curvature.safetensors.tmp",
             logs / "store.json.tmp", logs / "chunk_000000.bin", logs / "chunk_000000.json.tmp"]
    for link in links:
        os.symlink(victim, link)
    run = AnaLog("p", _config(tmp_path)).watch(model)
    _log(run, model, range(3))
    run.finalize()
    assert victim.read_text() == "untouched"
    assert len(LogStore(run.log_path)) == 3 * BATCH and not any(p.is_symlink() for p in links if p.exists())
    assert len(links) == 6


def test_corrupt_statistics_are_named(tmp_path):
    run = _project(tmp_path)
    stats = run.log_path / "chunk_000003.stats"
    _flip(stats, len(stats.read_bytes()) - 3)
    with pytest.raises(StoreError, match=f"statistics file {stats} does not match the checksum"):
        run.refit()


def test_verify_and_repair_then_refit_equals_a_fit_of_the_remaining_rows(tmp_path, capsys):
    run = _project(tmp_path)
    _flip(run.log_path / "chunk_000001.bin", 0)
    (run.log_path / "chunk_000003.json").unlink()
    assert cli(["store", "verify", str(run.path)]) == 1
    out = capsys.readouterr().out
    assert "chunk_000001.bin does not match its checksum" in out and "chunk_000003.json is missing" in out
    assert cli(["store", "repair", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "dropped: chunk_000001.json" in out and "dropped: chunk_000003.json" in out
    assert not list(run.log_path.glob("chunk_000001.*")) and not list(run.log_path.glob("chunk_000003.*"))
    assert json.loads((run.log_path / "repair.json").read_text()) == {"dropped": [[0, 1], [0, 3]]}
    assert cli(["store", "verify", str(run.log_path)]) == 0
    assert "fitted on other contents" in capsys.readouterr().out

    model = _model()
    reopened = AnaLog("p", _config(tmp_path)).watch(model)
    with pytest.warns(UserWarning, match="store changed since its kfac curvature was fitted"):
        reopened.eval()
    reference = _project(tmp_path, "ref", batches=[0, 2, 4])
    assert reopened.curvature.meta["n_samples"] == reference.curvature.meta["n_samples"] == 3 * BATCH
    keys = reference.curvature.state.keys()
    assert reopened.curvature.state.keys() == keys and len(keys) == 12
    for key in keys:
        torch.testing.assert_close(reopened.curvature.state[key], reference.curvature.state[key],
                                   rtol=1e-9, atol=1e-12)
    assert cli(["store", "verify", str(run.path)]) == 0
    assert "fitted on this store" in capsys.readouterr().out


def test_verify_and_repair_of_a_project_cover_every_segment(tmp_path, capsys):
    model = _model()
    run = AnaLog("p", _config(tmp_path)).watch(model)
    _log(run, model, range(3))
    _log(run, model, range(3))  # the same ids again: segment 1 (rule "repeat")
    run.finalize()
    first, later = run.path / "logs", run.path / "segments" / "0001" / "logs"
    assert len(list(later.glob("chunk_*.bin"))) == 3 and len(list(first.glob("chunk_*.bin"))) == 3
    assert cli(["store", "verify", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert out.count("  ok") == 2 and str(later) in out
    _flip(later / "chunk_000001.bin", 0)  # only the later segment is damaged
    assert cli(["store", "verify", str(run.path)]) == 1
    out = capsys.readouterr().out
    assert f"{later / 'chunk_000001.bin'} does not match its checksum" in out and out.count("  ok") == 1
    assert cli(["store", "repair", str(run.path)]) == 0
    assert "dropped 1 chunk(s)" in capsys.readouterr().out
    assert not list(later.glob("chunk_000001.*")) and len(list(first.glob("chunk_*.bin"))) == 3
    assert cli(["store", "verify", str(run.path)]) == 0


def test_verify_of_a_path_without_a_store_says_so(tmp_path, capsys):
    assert cli(["store", "verify", str(tmp_path)]) == 2
    assert f"no log store at {tmp_path}" in capsys.readouterr().out


@pytest.mark.parametrize("hessian", ["raw", "diagonal", "ekfac"])
def test_a_stale_curvature_refuses_queries_until_refit(tmp_path, hessian):
    from analog.analysis import InfluenceFunction
    from analog.hessian import CurvatureError

    run = _project(tmp_path, hessian=hessian)
    run.eval().add_analysis({"influence": InfluenceFunction})
    query = ([0], {m: {"grad": k["grad"][:1]} for m, k in LogStore(run.log_path).batch(0, 1)[1].items()})
    before = run.influence.compute_influence_all(query).scores
    for ext in ("json", "bin", "stats"):
        (run.log_path / f"chunk_000004.{ext}").unlink(missing_ok=True)
    with pytest.raises(CurvatureError, match="changed since the .* curvature was fitted"):
        run.influence.compute_influence_all(query)
    # the sharded path reads the same store (here the whole of it: no process group)
    with pytest.raises(CurvatureError, match="changed since the .* curvature was fitted"):
        run.influence.compute_influence_all(query, distributed=True)
    run.refit()
    after = run.influence.compute_influence_all(query).scores
    torch.testing.assert_close(run.influence.compute_influence_all(query, distributed=True).scores, after)
    assert after.shape == (1, 4 * BATCH) and before.shape == (1, 5 * BATCH)
    assert not torch.allclose(after, before[:, : 4 * BATCH])  # N and the statistics changed


HOLDER = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
import test_storage_integrity as t
from analog import AnaLog
model = t._model()
run = AnaLog("shared", t._config(sys.argv[1])).watch(model)
t._log(run, model, [0, 1])
run.flush()                      # two chunks on disk, the project's lock held
print("ready", flush=True)
time.sleep(120)
"""


def test_a_second_process_can_neither_log_nor_fit_while_the_first_writes(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        model = _model()
        other = AnaLog("shared", _config(tmp_path)).watch(model)
        with pytest.raises(StoreError, match="another writer"):
            _log(other, model, [2])
        with pytest.raises(StoreError, match="another writer"):
            other.refit()  # fitting and the state files are covered by the same lock
        assert not (tmp_path / "shared" / "state" / "curvature.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _log(other, model, [2, 3, 4])  # the killed writer's lock is gone with it
    other.finalize()
    reference = _project(tmp_path, "ref")
    assert other.curvature.meta["n_samples"] == 5 * BATCH
    for key, value in reference.curvature.state.items():
        torch.testing.assert_close(other.curvature.state[key], value, rtol=1e-9, atol=1e-12)
    assert len(reference.curvature.state) == 12


def test_repair_of_a_segment_store_waits_for_the_project_writer(tmp_path, capsys):
    model = _model()
    run = AnaLog("seg", _config(tmp_path)).watch(model)
    _log(run, model, [0, 1])
    assert run.new_segment() == 1
    _log(run, model, [2])  # segment 1 is being written: the project's lock is held
    segment_store = tmp_path / "seg" / "segments" / "0001" / "logs"
    assert (segment_store / "store.json").exists()
    assert cli(["store", "repair", str(segment_store)]) == 2
    assert "another writer" in capsys.readouterr().out
    run.finalize()
    assert cli(["store", "repair", str(segment_store)]) == 0
    assert "dropped" not in capsys.readouterr().out
