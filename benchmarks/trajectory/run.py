"""LDS on digits: final-model EK-FAC against attribution through the training trajectory.

    python -m benchmarks.trajectory.run                 # writes benchmarks/results/trajectory.{md,json}
    python -m benchmarks.trajectory.run --segments 1 5 10 --threads 1

Task, ground truth and LDS are those of benchmarks/influence (digits, MLP 64→32→10, full-batch Adam for
500 steps at lr 1e-2, 100 retrained half-subsets × 3 seeds). The model is trained again here, the same
deterministic way, and at K evenly spaced steps (the last one = the end of training) analog starts a new
segment (``analog.new_segment(lr=η, step=t)``) and logs every training example's gradient (cross-entropy,
``reduction="sum"``) at those parameters, keeping a checkpoint of the watched parameters per segment.
Then, with ``query_fn`` the test set's summed cross-entropy:

* ``tracin-cp``: Σ_s η_s g_q(θ_s)ᵀ g_t(θ_s)                (project with hessian "none")
* ``segment-ekfac``: Σ_s η_s g_q(θ_s)ᵀ (F̂_s + λI)⁻¹ g_t(θ_s)  (project with hessian "ekfac", one per segment)

K = 1 is the final model alone: ``segment-ekfac`` K=1 is final-model EK-FAC (checked against
analog's InfluenceFunction on the same project) and ``tracin-cp`` K=1 the final gradient dot product.
η_s = 0.01 (Adam's constant lr). Costs: ``log`` = time inside the logging passes and segment switches
(training steps excluded), ``fit`` = finalize, ``score`` = all trajectory queries; bytes on disk per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.trajectory.analysis import TrajectoryInfluence
from benchmarks.influence.ground_truth import load_or_compute, seed_consistency
from benchmarks.influence.lds import lds
from benchmarks.influence.task import build_task, make_model

RESULTS = Path(__file__).resolve().parents[1] / "results"
BATCH = 250


def checkpoint_steps(total: int, k: int):
    """K evenly spaced steps ending at ``total`` (the parameters after that many optimizer steps)."""
    return sorted({round(total * (i + 1) / k) for i in range(k)})


def train_and_log(task, run: AnaLog, steps):
    """Retrain the task's model (as benchmarks.influence.task.train) and log a segment after each step in
    ``steps``; returns (model, seconds spent logging)."""
    cfg = task.config
    model = make_model(cfg, seed=cfg.model_seed)
    run.watch(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    logging = 0.0
    for step in range(1, cfg.steps + 1):
        model.train()
        opt.zero_grad(set_to_none=True)
        l2 = sum((p * p).sum() for p in model.parameters())
        (F.cross_entropy(model(task.x_train), task.y_train) + 0.5 * cfg.weight_decay * l2).backward()
        opt.step()
        if step in steps:
            start = time.perf_counter()
            model.eval()
            run.new_segment(lr=cfg.lr, step=step)
            for lo in range(0, task.n_train, BATCH):
                idx = list(range(lo, min(lo + BATCH, task.n_train)))
                with run(data_id=idx):
                    F.cross_entropy(model(task.x_train[idx]), task.y_train[idx], reduction="sum").backward()
                model.zero_grad(set_to_none=True)
            logging += time.perf_counter() - start
    model.eval()
    return model, logging


def disk_bytes(path: Path) -> dict:
    out = {"logs": 0, "curvature": 0, "checkpoints": 0, "other": 0}
    for f in path.rglob("*"):
        if f.is_file():
            kind = ("logs" if "logs" in f.parts else "checkpoints" if f.name == "checkpoint.safetensors"
                    else "curvature" if f.name.startswith("curvature.") else "other")
            out[kind] += f.stat().st_size
    return out


def run_method(task, hessian: str, k: int, dampings) -> dict:
    """Train + log K segments, fit, score; LDS-ready scores per damping and the costs."""
    with tempfile.TemporaryDirectory() as root:
        run = AnaLog("traj", {"root_dir": root, "compression": {"type": "none"}, "hessian": hessian,
                              "progress": False, "segments": {"checkpoint": True, "rule": "manual"}})
        model, log_s = train_and_log(task, run, checkpoint_steps(task.config.steps, k))
        final = {k_: v.detach().clone() for k_, v in model.state_dict().items()}
        drift = max(float((final[n] - task.model.state_dict()[n]).abs().max()) for n in final)
        start = time.perf_counter()
        run.eval()
        fit_s = time.perf_counter() - start
        run.add_analysis({"trajectory": TrajectoryInfluence, "influence": InfluenceFunction})

        def query_fn():
            return F.cross_entropy(model(task.x_test), task.y_test, reduction="sum")

        out = {"k": k, "hessian": hessian, "log_s": log_s, "fit_s": fit_s, "bytes": disk_bytes(Path(root)),
               "final_param_drift": drift, "scores": {}, "score_s": {}}
        for damping in dampings:
            start = time.perf_counter()
            if hessian == "none":
                scores = run.trajectory.tracin_cp(query_fn)
            else:
                scores = run.trajectory.segment_wise(query_fn, damping=damping)
            out["score_s"][str(damping)] = time.perf_counter() - start
            out["scores"][str(damping)] = scores.scores.numpy() / task.config.lr
            if k == 1 and hessian != "none":  # the final-model EK-FAC of the facade, for the record
                with run():
                    query_fn().backward()
                model.zero_grad()
                classic = run.influence.compute_influence_all(run.get_log(), damping=damping).scores.numpy()
                out.setdefault("classic_max_rel_diff", {})[str(damping)] = float(
                    np.abs(classic - out["scores"][str(damping)]).max() / np.abs(classic).max())
            if hessian == "none":
                break
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task("small")
    gt = load_or_compute(task)
    rows = []
    for hessian in ("ekfac", "none"):
        for k in args.segments:
            res = run_method(task, hessian, k, [task.damping, None])
            for damping, scores in res["scores"].items():
                row = {key: res[key] for key in ("k", "hessian", "log_s", "fit_s", "bytes", "final_param_drift")}
                row.update(damping=damping, score_s=res["score_s"][damping],
                           lds=lds(scores, gt["masks"], gt["outputs"]),
                           classic_max_rel_diff=res.get("classic_max_rel_diff", {}).get(damping))
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs: wall times are "
                       f"noisy), {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                       f"python {platform.python_version()}",
            "command": "python -m benchmarks.trajectory.run --segments " + " ".join(map(str, args.segments)),
            "seed_consistency": seed_consistency(gt["outputs_per_seed"]), "damping": task.damping}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trajectory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_report(meta, rows, RESULTS / "trajectory.md")


NOTES = """
- **Setting**: the task's model is retrained (same deterministic full-batch Adam, final parameters identical to the
  task's: `final_param_drift` 0 in the JSON); after each of K evenly spaced steps (the last = step 500) a segment
  logs all 1,000 training gradients at those fixed parameters with a checkpoint. K = 1 is the final model alone.
- **Scores**: TracIn-CP Σ_s η_s g_q(θ_s)ᵀ g_t(θ_s); segment-wise Σ_s η_s g_q(θ_s)ᵀ (F̂_s + λI)⁻¹ g_t(θ_s) with one
  EK-FAC per segment (empirical Fisher of that segment's logs); η_s = Adam's constant lr (a common factor).
  The query gradients at every θ_s come from `analog.at_segment(s)` (the checkpoint put into the model).
- **Costs**: `log + fit` = the logging passes, the segment switches and fitting every segment's curvature
  (training steps excluded); `score` = every query at every segment (600 test examples); bytes on disk
  of the uncompressed float32 logs, the curvatures and the checkpoints (the watched parameters).
- **Check**: final-model EK-FAC through `analog.trajectory` (K = 1) equals analog's `InfluenceFunction` on the
  same project to float32 rounding (`classic_max_rel_diff` in the JSON, relative to the largest score).
- **LDS** against the same ground truth as benchmarks/results/influence.md (the *final* model's test
  loss after retraining on random halves).
"""


def write_report(meta: dict, rows: list, path: Path) -> None:
    lines = ["# Attribution through the training trajectory (digits LDS)", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`. Task and ground truth: "
             f"benchmarks/influence (`digits-mlp32`; seed consistency {meta['seed_consistency']:.3f}).", "",
             "| method | segments K | damping λ | LDS | log + fit (s) | score (s) | logs (MB) | curvature (MB) "
             "| checkpoints (kB) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "segment-wise EK-FAC" if r["hessian"] == "ekfac" else "TracIn-CP"
        if r["k"] == 1:
            name = "final-model EK-FAC" if r["hessian"] == "ekfac" else "final-model gradient dot"
        damping = "—" if r["hessian"] == "none" else ("0.1 × mean eig." if r["damping"] == "None" else r["damping"])
        b = r["bytes"]
        lines.append(f"| {name} | {r['k']} | {damping} | {r['lds']:.3f} | {r['log_s'] + r['fit_s']:.2f} | "
                     f"{r['score_s']:.2f} | {b['logs'] / 1e6:.1f} | {b['curvature'] / 1e6:.2f} | "
                     f"{b['checkpoints'] / 1e3:.1f} |")
    path.write_text("\n".join(lines) + "\n" + NOTES)


if __name__ == "__main__":
    main()
