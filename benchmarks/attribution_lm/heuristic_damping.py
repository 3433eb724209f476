"""``run.py`` with a per-method factor for analog's heuristic damping (λ = factor × mean eigenvalue per module).

A method may carry ``"heuristic": 0.2`` (default 0.1, analog's ``HEURISTIC_DAMPING``); the factor is set
for that method's fit and scores and restored after it. Every other argument goes to ``run.py``::

    python -m benchmarks.attribution_lm.heuristic_damping --preset cpu4k --tasks lm \
        --methods-file benchmarks/attribution_lm/damping_cpu4k.json --no-peers --threads 1 --out ...
"""

import runpy

import analog.hessian.base as base
import benchmarks.attribution_lm.harness as harness

_run_analog = harness.run_analog


def run_analog(task, method, root=None):
    base.HEURISTIC_DAMPING = float(method.get("heuristic", 0.1))
    try:
        return _run_analog(task, method, root)
    finally:
        base.HEURISTIC_DAMPING = 0.1


if __name__ == "__main__":
    harness.run_analog = run_analog
    runpy.run_module("benchmarks.attribution_lm.run", run_name="__main__")
