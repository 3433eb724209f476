"""The default storage dtype, ``auto``: int8 rows for compressed logs, float32 for uncompressed ones
and under ``nonfinite: allow``; an explicit dtype is honoured, and a project keeps the dtype it was
first logged with when reopened with the default config."""

import json

import pytest
import torch
from torch import nn

from analog import AnaLog, Config
from analog.state import ProjectError
from analog.storage import LogStore
from analog.storage.encoding import STORE_DTYPES

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


def test_default_config_is_auto_and_stores_logra_rows_as_int8(tmp_path):
    assert Config().storage.dtype == "auto"
    run, _ = _logged(tmp_path)
    store = LogStore(run.log_path)
    assert store.header["dtype"] == "int8" and len(store.fields) == FIELDS
    # int8: one float32 scale per field, one byte per value
    assert store.row_bytes == 4 * FIELDS + LOGRA_VALUES == 26
    assert _bin_bytes(run.log_path) == 6 * 26 and len(store) == 6


def test_default_without_compression_stores_float32(tmp_path):
    run, _ = _logged(tmp_path, compression={"type": "none"})
    store = LogStore(run.log_path)
    assert store.header["dtype"] == "float32"
    assert store.row_bytes == 4 * RAW_VALUES and _bin_bytes(run.log_path) == 6 * 4 * RAW_VALUES


@pytest.mark.parametrize("dtype,row_bytes", [("float32", 4 * LOGRA_VALUES), ("bfloat16", 2 * LOGRA_VALUES),
                                             ("int4", 4 * FIELDS + LOGRA_VALUES // 2)])
def test_an_explicit_dtype_is_honoured(tmp_path, dtype, row_bytes):
    run, _ = _logged(tmp_path, storage={"dtype": dtype})
    store = LogStore(run.log_path)
    assert store.header["dtype"] == dtype and store.row_bytes == row_bytes
    assert _bin_bytes(run.log_path) == 6 * row_bytes


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


def test_a_float32_project_reopened_with_the_default_config_keeps_float32_and_appends(tmp_path):
    _logged(tmp_path / "a", ids=range(6), storage={"dtype": "float32"})
    # reopened without storage.dtype (the default, auto): the saved float32 wins
    model = _model()
    again = AnaLog("p", {"root_dir": str(tmp_path / "a")})
    assert again.config.storage.dtype == "float32" and again.config.store_dtype == "float32"
    again.watch(model)
    _log(again, model, [6, 7, 8])
    again.finalize()
    store = LogStore(again.log_path)
    assert store.header["dtype"] == "float32" and store.ids == list(range(9))
    # the appended rows equal those of a fresh float32 project logging the same batch, bit for bit
    ref, _ = _logged(tmp_path / "b", ids=[6, 7, 8], storage={"dtype": "float32"})
    appended, expected = store.rows(6, 9), LogStore(ref.log_path).rows(0, 3)
    assert appended.shape == expected.shape == (3, LOGRA_VALUES)
    assert torch.equal(appended, expected)


def test_auto_is_accepted_and_an_unknown_dtype_lists_it(tmp_path):
    assert Config.from_dict({"storage": {"dtype": "auto"}}).store_dtype == "int8"
    assert Config.from_dict({"storage": {"dtype": "auto"}, "compression": {"type": "none"}}).store_dtype == "float32"
    assert Config.from_dict({"storage": {"dtype": "int4"}}).store_dtype == "int4"
    with pytest.raises(ValueError, match=r"storage.dtype': unknown 'int3'") as err:
        AnaLog("p", {"root_dir": str(tmp_path), "storage": {"dtype": "int3"}})
    offered = str(err.value).split("choose from ")[1]
    assert all(f"'{d}'" in offered for d in ("auto", *STORE_DTYPES)) and len(STORE_DTYPES) == 6


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
