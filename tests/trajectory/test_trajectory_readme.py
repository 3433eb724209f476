"""The README's training-loop example (segments, then TracIn-CP and segment-wise scores) runs as written."""

import re
import textwrap
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"


def section_code():
    text = README.read_text(encoding="utf-8").split("## Logging during training", 1)[1].split("\n## ", 1)[0]
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", text, re.S)]


def test_readme_training_loop_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    namespace = {"model": model, "optimizer": optimizer,
                 "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
                 "loader": [(x[i : i + 10], y[i : i + 10], list(range(i, i + 10))) for i in range(0, 30, 10)],
                 "test_x": torch.randn(4, 5), "test_y": torch.randint(0, 3, (4,))}
    blocks = section_code()
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    run = namespace["analog"]
    assert [r["lr"] for r in run.segments.summary()] == [0.1, 0.05, 0.025]
    assert all(r["checkpoint_bytes"] > 0 for r in run.segments.summary())
    scores = run.trajectory.segment_wise(namespace["query_fn"])
    assert scores.scores.shape == (4, 30) and scores.train_ids == list(range(30))
