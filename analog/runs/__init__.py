"""Run logs: parse training logs, compare runs, plot and summarise.

```python
from analog.runs import parse_training_log, compare_runs, RunComparator

metrics = parse_training_log("runs/my_run/train.log")
print(f"Final PPL: {metrics.ppl[-1]:.2f}")
compare_runs({"TTL": "runs/ttl/train.log", "Ablation": "runs/abl/train.log"}, output_dir="out/cmp")
```
"""

from analog.runs.comparator import RunComparator, compare_runs
from analog.runs.log_parser import LogParseError, LogParser, detect_format, parse_number, parse_training_log
from analog.runs.plots import (
    moving_average,
    plot_loss_comparison,
    plot_ppl_comparison,
    plot_throughput,
    plot_throughput_comparison,
    plot_training_curves,
    smooth,
)
from analog.runs.training_metrics import TrainingMetrics

__all__ = [
    "LogParseError",
    "LogParser",
    "RunComparator",
    "TrainingMetrics",
    "compare_runs",
    "detect_format",
    "moving_average",
    "parse_number",
    "parse_training_log",
    "plot_loss_comparison",
    "plot_ppl_comparison",
    "plot_throughput",
    "plot_throughput_comparison",
    "plot_training_curves",
    "smooth",
]
