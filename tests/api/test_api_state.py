"""State on disk: finalize() twice changes nothing, and a new process that builds the same AnaLog
reads the store with the same projection; another projection or module set is a clear error."""

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.ids import to_ids
from analog.state import ProjectError
from analog.storage import LogStore, StoreError

COMMON = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def make_data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)

    def config(root, **compression):
        # float32: the stored rows are compared with the recomputed gradients exactly (to float tolerance)
        return {"root_dir": root, "hessian": "kfac", "storage": {"dtype": "float32", "flush_bytes": 1024},
                "compression": {"rank": 4, "seed": 5, **compression}}
""")
_helpers: dict = {}
exec(COMMON, _helpers)  # the same helpers in this process and in the child
make_model = _helpers["make_model"]
make_data = _helpers["make_data"]
config = _helpers["config"]

CHILD = COMMON + textwrap.dedent("""
    import json, sys
    from analog import AnaLog
    torch.set_num_threads(1)
    model, (x, y) = make_model(), make_data()
    run = AnaLog("proj", config(sys.argv[1]))
    run.watch(model)
    for s in range(0, 40, 8):
        with run(data_id=x[s:s + 8]):           # the inputs are the ids
            nn.functional.cross_entropy(model(x[s:s + 8]), y[s:s + 8], reduction="sum").backward()
        model.zero_grad()
    run.finalize()
    print(json.dumps(run.projector.fingerprint()))
""")


@pytest.fixture(scope="module")
def logged_elsewhere(tmp_path_factory):
    """A project logged and finalized by another process."""
    root = tmp_path_factory.mktemp("state")
    out = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return root, json.loads(out.stdout.splitlines()[-1])


def test_state_restores_in_a_new_process(logged_elsewhere):
    root, child_fingerprint = logged_elsewhere
    model, (x, y) = make_model(), make_data()
    run = AnaLog("proj", config(str(root)))
    run.watch(model)
    assert run.projector.fingerprint() == child_fingerprint
    assert run.curvature.meta["finalized"] and run.curvature.meta["n_samples"] == 40
    batches = list(run.build_log_dataloader(batch_size=16))
    ids = [i for b, _ in batches for i in b]
    assert ids == to_ids(x), "content-hash ids are the same in both processes"
    # the restored projection gives the stored gradients back for the same examples
    run.eval()
    compared = 0
    for s in range(0, 40, 8):
        with run(data_id=x[s:s + 8]):
            nn.functional.cross_entropy(model(x[s:s + 8]), y[s:s + 8], reduction="sum").backward()
        model.zero_grad()
        q_ids, q_logs = run.get_log()
        assert q_ids == ids[s:s + 8]
        store = run.open_store()
        _, stored = store.batch(s, s + 8)
        for m in q_logs:
            torch.testing.assert_close(stored[m]["grad"], q_logs[m]["grad"])
            compared += 1
    assert compared == 10


def test_reopening_with_another_projection_is_an_error_naming_the_key(logged_elsewhere):
    root, _ = logged_elsewhere
    with pytest.raises(ProjectError, match=r"compression.seed: saved 5, given 6"):
        AnaLog("proj", config(str(root), seed=6))


def test_a_store_read_with_another_projection_is_an_error(logged_elsewhere):
    root, _ = logged_elsewhere
    run = AnaLog("other", config(str(root), seed=6))
    run.watch(make_model())
    with pytest.raises(StoreError, match=r"different compression(.|\n)*'seed': 5(.|\n)*'seed': 6"):
        LogStore(root / "proj" / "logs", expect_compression=run.projector.fingerprint())


def test_reading_with_another_module_set_is_an_error(logged_elsewhere):
    root, _ = logged_elsewhere
    run = AnaLog("proj", config(str(root)))
    run.watch(make_model(), name_filter=["2"])
    with pytest.raises(StoreError, match=r"module\(s\) \['0'\] that this reader does not watch"):
        run.build_log_dataloader(batch_size=8)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_finalize_twice_is_harmless(tmp_path):
    model, (x, y) = make_model(), make_data()
    run = AnaLog("p", config(str(tmp_path)))
    run.watch(model)
    for s in range(0, 40, 8):
        with run(data_id=list(range(s, s + 8))):
            nn.functional.cross_entropy(model(x[s:s + 8]), y[s:s + 8], reduction="sum").backward()
        model.zero_grad()
    run.finalize()
    files = _digest(run.path)
    assert any(k.startswith("state/curvature") for k in files) and any(k.startswith("logs/chunk_") for k in files)
    curvature = {k: v.clone() for k, v in run.curvature.state.items()}
    run.finalize()
    run.eval()
    assert _digest(run.path) == files, "a second finalize must not change the store or the state"
    assert curvature.keys() == run.curvature.state.keys()
    assert all(torch.equal(curvature[k], run.curvature.state[k]) for k in curvature)
    assert len(run.open_store()) == 40
