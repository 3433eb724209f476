"""Subset-retraining ground truth for the LDS (see ``lds.py`` for the score itself).

M random subsets of the training split, each holding ``round(α·n_train)`` examples (α = 0.5), are drawn
with a seeded generator. On each subset the model is retrained from scratch from every init seed in
``seeds`` (the same seeds for every subset) with the task's own deterministic training, and each test
example's cross-entropy loss is measured. The LDS target is the mean over seeds:

    outputs[m, q] = (1/|seeds|) Σ_s  CE( f_{θ_s(S_m)}(x_q), y_q )

Cached to ``results/ground_truth_<task name>.npz`` with ``masks`` (M × n_train, bool), ``outputs``
(M × n_test), ``outputs_per_seed`` (M × |seeds| × n_test) and the settings; a cache whose settings differ
is recomputed.

    python -m benchmarks.influence.ground_truth --config small --subsets 100 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.influence.lds import spearman_columns
from benchmarks.influence.task import CONFIGS, Task, build_task, make_model, per_example_loss, train

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cache_path(task: Task) -> Path:
    return RESULTS_DIR / f"ground_truth_{task.config.name}.npz"


def draw_masks(n_train: int, n_subsets: int, alpha: float, seed: int) -> np.ndarray:
    """M × n_train boolean masks, each with exactly round(α·n_train) entries set."""
    rng = np.random.default_rng(seed)
    k = int(round(alpha * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=k, replace=False)] = True
    return masks


def retrain_outputs(task: Task, masks: np.ndarray, seeds, log_every: int = 10) -> np.ndarray:
    """Test losses after retraining on each subset from each seed: M × |seeds| × n_test."""
    out = np.zeros((len(masks), len(seeds), task.n_test), dtype=np.float64)
    start = time.time()
    for m, mask in enumerate(masks):
        idx = torch.from_numpy(np.flatnonzero(mask))
        for j, seed in enumerate(seeds):
            model = train(make_model(task.config, seed), task.x_train[idx], task.y_train[idx], task.config)
            out[m, j] = per_example_loss(model, task.x_test, task.y_test).numpy()
        if log_every and (m + 1) % log_every == 0:
            print(f"  subset {m + 1}/{len(masks)}  ({time.time() - start:.0f} s)", flush=True)
    return out


def seed_consistency(outputs_per_seed: np.ndarray) -> float:
    """Mean over test examples of Spearman_m(seed 0's loss, mean of the other seeds' losses).

    A rough noise ceiling: how well one retraining predicts the others. With one seed it is undefined (nan).
    """
    if outputs_per_seed.shape[1] < 2:
        return float("nan")
    first = outputs_per_seed[:, 0]
    rest = outputs_per_seed[:, 1:].mean(1)
    return float(np.mean(spearman_columns(first, rest)))


def load_or_compute(
    task: Task, n_subsets: int = 100, alpha: float = 0.5, seeds=(0, 1, 2), mask_seed: int = 1234
) -> dict:
    """Return the ground truth for ``task``, computing and caching it if needed."""
    settings = {
        "task": task.config.__dict__,
        "n_subsets": n_subsets,
        "alpha": alpha,
        "seeds": list(seeds),
        "mask_seed": mask_seed,
    }
    path = cache_path(task)
    if path.exists():
        cached = np.load(path)
        if json.loads(str(cached["settings"])) == settings:
            return {k: cached[k] for k in ("masks", "outputs", "outputs_per_seed")} | {"settings": settings}
        print(f"ground truth cache {path.name} has other settings; recomputing")
    masks = draw_masks(task.n_train, n_subsets, alpha, mask_seed)
    print(f"ground truth: {n_subsets} subsets × {len(seeds)} seeds of {task.config.name}", flush=True)
    per_seed = retrain_outputs(task, masks, seeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        masks=masks,
        outputs=per_seed.mean(1),
        outputs_per_seed=per_seed,
        settings=json.dumps(settings),
    )
    return {"masks": masks, "outputs": per_seed.mean(1), "outputs_per_seed": per_seed, "settings": settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task(args.config)
    start = time.time()
    gt = load_or_compute(task, n_subsets=args.subsets, seeds=tuple(range(args.seeds)))
    print(f"done in {time.time() - start:.0f} s -> {cache_path(task)}")
    print(f"seed consistency (noise ceiling, Spearman): {seed_consistency(gt['outputs_per_seed']):.3f}")


if __name__ == "__main__":
    main()
