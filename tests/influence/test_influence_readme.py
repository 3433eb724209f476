"""The README's quick start runs as written (on a tiny model, in a temporary directory)."""

import re
import warnings
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    namespace = {
        "model": nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)),
        "data_loader": [(x[i : i + 10], y[i : i + 10], list(range(i, i + 10))) for i in range(0, 40, 10)],
        "test_input": torch.randn(4, 5),
        "test_target": torch.randint(0, 3, (4,)),
    }
    with warnings.catch_warnings():  # a user copying the block sees no warning from analog
        warnings.filterwarnings("error", module="analog")
        warnings.filterwarnings("error", message="analog")
        exec(compile(quick_start_code(), str(README), "exec"), namespace)
    assert not namespace["model"].training
    scores = namespace["scores"]
    assert scores.scores.shape == (4, 40)
    assert scores.train_ids == list(range(40))
    top = scores.topk(5)
    assert len(top["helpful"]) == 4 and all(len(row) == 5 for row in top["helpful"])
    assert (tmp_path / "analog_logs" / "my_project" / "logs" / "store.json").exists()
    assert namespace["ids"] == list(range(40)) and namespace["self_inf"].shape == (40,)
    # s(t, t) is the score of t against itself: the diagonal of the training set's own score matrix
    batches = list(namespace["log_loader"])
    ids = [i for b_ids, _ in batches for i in b_ids]
    logs = {m: {"grad": torch.cat([b[1][m]["grad"] for b in batches])} for m in batches[0][1]}
    own = namespace["analog"].influence.compute_influence((ids, logs), (ids, logs)).scores
    assert ids == namespace["ids"] and own.shape == (40, 40)
    torch.testing.assert_close(namespace["self_inf"], own.diagonal(), rtol=1e-4, atol=1e-5)
