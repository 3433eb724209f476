"""The README's quick start runs as written (on a tiny model, in a temporary directory)."""

import json
import re
import textwrap
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


def query_init_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("- `query` (projections fitted", 1)[1]
    return textwrap.dedent(re.search(r"```python\n(.*?)```", section, re.S).group(1))


def test_readme_query_init_loop_runs_as_written(tmp_path, monkeypatch):
    """The Compression section's ``init: query`` loop: three passes, the query loader only in the query pass,
    int4 rows of 4F + ceil(n/2) bytes holding the training ids only."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    xq, yq = torch.randn(60, 5), torch.randint(0, 3, (60,))
    seen = {"train": 0, "query": 0}

    def loss_fn(model, batch):
        seen[batch[2]] += len(batch[0])
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 3)).eval()
    namespace = {
        "model": model, "loss_fn": loss_fn,
        "train_loader": [(list(range(i, i + 10)), (x[i : i + 10], y[i : i + 10], "train")) for i in range(0, 40, 10)],
        "query_loader": [([f"q{j}" for j in range(i, i + 20)], (xq[i : i + 20], yq[i : i + 20], "query"))
                         for i in range(0, 60, 20)],
    }
    exec(compile(query_init_code(), str(README), "exec"), namespace)
    assert seen == {"train": 80, "query": 60}  # statistics and log passes over the training data, one query pass
    run = namespace["run"]
    assert run.phase == "log" and run.curvature.meta["finalized"]
    assert run.projector.tensors["2/in"].shape == (1, 65, 45)  # 64 inputs + bias, projected to rank 45
    store = run.open_store()
    assert len(store) == 40 and all(store.holds(i) for i in range(40)) and not store.holds("q0")
    header = json.loads((tmp_path / "analog_logs" / "p" / "logs" / "store.json").read_text())
    n = sum(int(torch.Size(f["shape"]).numel()) for f in header["fields"])
    assert header["dtype"] == "int4" and len(header["fields"]) == 3 and header["row_elems"] == n
    chunks = sorted((tmp_path / "analog_logs" / "p" / "logs").glob("chunk_*.bin"))
    assert sum(c.stat().st_size for c in chunks) == 40 * (4 * 3 + (n + 1) // 2)
