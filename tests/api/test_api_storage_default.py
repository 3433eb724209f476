"""The default storage dtype, ``auto``: int8 rows for compressed logs, float32 for uncompressed ones
and under ``nonfinite: allow``; an explicit dtype is honoured, and a project keeps the dtype it was
first logged with when reopened with the default config."""

import json

import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.state import ProjectError
from analog.storage import LogStore

# the model below: Linear(5, 7) and Linear(7, 3), per-sample gradients of weight and bias, 7·(5 + 1)
# and 3·(7 + 1) values; LoGra rank 3 sketches each to 3 × 3 values; one field (grad log) per module
FIELDS = 2
RAW_VALUES = 7 * (5 + 1) + 3 * (7 + 1)
LOGRA_VALUES = 2 * 3 * 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _log(run, model, ids):
    x = torch.cos(torch.tensor(ids, dtype=torch.float32)[:, None] * 0.9 + torch.arange(5.0))
    with run(data_id=ids):
        nn.functional.cross_entropy(model(x), torch.tensor(ids) % 3, reduction="sum").backward()
    model.zero_grad()


def _logged(root, ids=(0, 1, 2, 3, 4, 5), project="p", **config):
    model = _model()
    run = AnaLog(project, {"root_dir": str(root), "compression": {"rank": 3}, **config})
    run.watch(model)
    _log(run, model, list(ids))
    run.finalize()
    return run, model


def _bin_bytes(store_path):
    return sum(f.stat().st_size for f in store_path.glob("chunk_*.bin"))


def test_auto_under_nonfinite_allow_stores_float32_so_nan_can_be_kept(tmp_path):
    """An int8 store holds finite values only: 'auto' must not turn nonfinite='allow' into an error."""
    model = _model()
    run = AnaLog("p", {"root_dir": str(tmp_path), "compression": {"rank": 3}, "nonfinite": "allow"})
    run.watch(model)
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    with run(data_id=[0, 1, 2]):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]), reduction="sum").backward()
    run.finalize()
    store = LogStore(run.log_path)
    assert store.header["dtype"] == "float32"
    assert torch.isfinite(store.rows(0, 3)).all(1).tolist() == [True, False, True]


def test_the_saved_config_records_the_resolved_dtype_and_a_reopen_keeps_it(tmp_path):
    run, _ = _logged(tmp_path)
    saved = json.loads((run.state_path / "config.json").read_text())
    assert saved["storage"]["dtype"] == "int8"  # what the rows are stored in, not 'auto'
    # nonfinite='allow' would resolve 'auto' to float32 on a new project; this one stays int8 and appends
    model = _model()
    again = AnaLog("p", {"root_dir": str(tmp_path), "nonfinite": "allow", "storage": {"dtype": "auto"}})
    assert again.config.store_dtype == "int8"
    again.watch(model)
    _log(again, model, [6, 7, 8])
    again.finalize()
    store = LogStore(again.log_path)
    assert store.header["dtype"] == "int8" and store.ids == list(range(9))
    with pytest.raises(ProjectError, match=r"storage.dtype: saved 'int8', given 'float32'"):
        AnaLog("p", {"root_dir": str(tmp_path), "storage": {"dtype": "float32"}})
