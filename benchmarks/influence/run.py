"""Run every registered influence method, each in its own subprocess, and write the comparison table.

    .venv-bench/bin/python -m benchmarks.influence.run                  # all methods, task "small"
    .venv-bench/bin/python -m benchmarks.influence.run --methods kronfluence-ekfac trak --repeat 3

Per method (fresh process, ``--threads`` torch threads, the task built and the method's libraries imported
*before* the clock starts):

- wall time: fit + score, one ``time.perf_counter`` interval around the ``(task) -> scores`` call;
- peak RSS: the child's ``VmHWM`` (the parent's ``RUSAGE_CHILDREN`` ``ru_maxrss`` is kept as a cross-check);
  ``ΔRSS`` subtracts the child's RSS just before the call (python + torch + the task, ~300 MB);
- LDS against ``ground_truth.py`` (definition and sign in ``lds.py``).

Repeated-query case: one training set, the test set split into ``n_query_batches`` batches, a
``(task, query_batches) -> [scores per batch]`` call timed as a whole (fit once + every batch).

Extending: ``analog_methods.py`` beside this file (written by analog's side; optional) may define

    METHODS: dict[str, Callable[[Task], np.ndarray]]                       # n_test × n_train
    REPEATED_QUERY_METHODS: dict[str, Callable[[Task, list[np.ndarray]], list[np.ndarray]]]

with analog's sign convention (positive = helps); its entries are run like the peers'. Without the module,
only the peers and baselines run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from benchmarks.influence import baselines, peers
from benchmarks.influence.ground_truth import RESULTS_DIR, load_or_compute, seed_consistency
from benchmarks.influence.lds import lds
from benchmarks.influence.report import write_report
from benchmarks.influence.task import CONFIGS, build_task

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "kronfluence-ekfac"


@dataclasses.dataclass(frozen=True)
class Method:
    fn: Callable
    family: str  # "analog", "peer" or "baseline"
    imports: Tuple[str, ...] = ()


def registry() -> Tuple[Dict[str, Method], Dict[str, Method]]:
    """(all-queries methods, repeated-query methods), analog's first when ``analog_methods`` exists."""
    methods: Dict[str, Method] = {}
    repeated: Dict[str, Method] = {}
    # ---- analog's methods: benchmarks/influence/analog_methods.py (optional) ---------------------------
    try:
        analog_methods = importlib.import_module("benchmarks.influence.analog_methods")
    except ModuleNotFoundError as err:
        if err.name != "benchmarks.influence.analog_methods":
            raise
    else:
        for name, fn in getattr(analog_methods, "METHODS", {}).items():
            methods[name] = Method(fn, "analog", ("analog",))
        for name, fn in getattr(analog_methods, "REPEATED_QUERY_METHODS", {}).items():
            repeated[name] = Method(fn, "analog", ("analog",))
    # ---- peers ---------------------------------------------------------------------------------------
    kron, trak, dattri = peers.IMPORTS["kronfluence"], peers.IMPORTS["trak"], peers.IMPORTS["dattri"]
    methods["kronfluence-ekfac"] = Method(peers.kronfluence_ekfac, "peer", kron)
    methods["kronfluence-kfac"] = Method(peers.kronfluence_kfac, "peer", kron)
    methods["kronfluence-ekfac-empirical"] = Method(peers.kronfluence_ekfac_empirical, "peer", kron)
    methods["trak"] = Method(peers.trak, "peer", trak)
    methods["dattri-explicit"] = Method(peers.dattri_explicit, "peer", dattri)
    methods["dattri-cg"] = Method(peers.dattri_cg, "peer", dattri)
    repeated["kronfluence-ekfac"] = Method(peers.kronfluence_ekfac_repeated, "peer", kron)
    # ---- library-free references ---------------------------------------------------------------------
    methods["exact-fisher"] = Method(baselines.exact_fisher, "baseline")
    methods["grad-dot"] = Method(baselines.grad_dot, "baseline")
    methods["random"] = Method(baselines.random_scores, "baseline")
    return methods, repeated


# ------------------------------------------------------------------------------------------------- child
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, kind: str, config: str, scores_path: Path, json_path: Path) -> None:
    """Build the task, import, time one call, save the scores (n_test × n_train) and the numbers."""
    methods, repeated = registry()
    method = (methods if kind == "all" else repeated)[name]
    for module in method.imports:
        importlib.import_module(module)
    task = build_task(config)
    batches = task.query_batches()
    baseline_rss = _rss_mb("VmRSS")
    start = time.perf_counter()
    if kind == "all":
        scores = np.asarray(method.fn(task))
        per_batch = None
    else:
        per_batch = [np.asarray(s) for s in method.fn(task, batches)]
        scores = np.concatenate(per_batch, axis=0)
    wall = time.perf_counter() - start
    peak = _rss_mb("VmHWM")
    if scores.shape != (task.n_test, task.n_train):
        raise ValueError(f"{name} returned {scores.shape}, expected {(task.n_test, task.n_train)}")
    np.save(scores_path, scores.astype(np.float64))
    out = {"wall_s": wall, "peak_rss_mb": peak, "baseline_rss_mb": baseline_rss}
    json_path.write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ parent
def run_one(name: str, kind: str, config: str, threads: int, workdir: Path, index: int) -> dict:
    scores_path = workdir / f"scores_{config}_{kind}_{name}_run{index}.npy"
    json_path = workdir / f"child_{config}_{kind}_{name}_run{index}.json"
    cmd = [sys.executable, "-m", "benchmarks.influence.run", "--child", name, "--kind", kind,
           "--config", config, "--threads", str(threads), "--scores-out", str(scores_path),
           "--json-out", str(json_path)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result = json.loads(json_path.read_text())
    # ru_maxrss of children is the max over all children so far: meaningful only when it grew.
    result["ru_maxrss_mb"] = after / 1024 if after > before else None
    result["scores_path"] = str(scores_path.relative_to(REPO_ROOT))
    return result


def summarise(runs: list, gt: dict, scores_paths: list) -> dict:
    ldss = [lds(np.load(REPO_ROOT / p), gt["masks"], gt["outputs"]) for p in scores_paths]
    return {
        "lds": float(np.mean(ldss)),
        "lds_runs": ldss,
        "wall_s": float(np.median([r["wall_s"] for r in runs])),
        "wall_s_runs": [r["wall_s"] for r in runs],
        "peak_rss_mb": float(max(r["peak_rss_mb"] for r in runs)),
        "delta_rss_mb": float(max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs)),
        "ru_maxrss_mb": [r["ru_maxrss_mb"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--methods", nargs="*", help="all-queries methods to run (default: all)")
    parser.add_argument("--repeated", nargs="*", help="repeated-query methods to run (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", default=str(REPO_ROOT / "benchmarks" / "results" / "influence.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.kind, args.config, args.scores_out, args.json_out)
        return

    methods, repeated = registry()
    selected = {"all": args.methods or list(methods), "repeated": args.repeated or list(repeated)}
    if args.repeated == []:
        selected["repeated"] = []
    task = build_task(args.config)
    gt = load_or_compute(task)
    workdir = RESULTS_DIR / "runs"
    workdir.mkdir(parents=True, exist_ok=True)

    results = {"all": {}, "repeated": {}}
    for kind, names in selected.items():
        table = methods if kind == "all" else repeated
        for name in names:
            runs, paths = [], []
            for i in range(args.repeat):
                print(f"[{kind}] {name} run {i + 1}/{args.repeat} ...", end=" ", flush=True)
                r = run_one(name, kind, args.config, args.threads, workdir, i)
                if "error" in r:
                    print("FAILED:", r["error"])
                    runs = [r]
                    break
                runs.append(r)
                paths.append(r["scores_path"])
                print(f"{r['wall_s']:.2f} s, peak {r['peak_rss_mb']:.0f} MB", flush=True)
            summary = {"error": runs[0]["error"]} if "error" in runs[0] else summarise(runs, gt, paths)
            summary["family"] = table[name].family
            results[kind][name] = summary
            if "lds" in summary:
                print(f"    LDS {summary['lds']:.3f}")

    meta = {
        "command": " ".join([_python_shown(), "-m", "benchmarks.influence.run", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, no GPU",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "repeat": args.repeat,
        "task": dataclasses.asdict(task.config),
        "damping": task.damping,
        "ground_truth": gt["settings"] | {"seed_consistency": seed_consistency(gt["outputs_per_seed"])},
        "reference": REFERENCE,
        "peer_versions": _versions(),
        "trak_proj_dim": peers.TRAK_PROJ_DIM,
        "dattri_cg_iterations": peers.CG_ITERATIONS,
        "dattri_cg_test_batch": peers.CG_TEST_BATCH,
    }
    payload = {"meta": meta, "results": results}
    json_path = RESULTS_DIR / f"influence_{args.config}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    write_report(payload, Path(args.report))
    print(f"wrote {json_path.relative_to(REPO_ROOT)} and {args.report}")


def _python_shown() -> str:
    """The interpreter as typed from the repo root (``.venv-bench/bin/python``), else its full path."""
    exe = Path(sys.executable)
    try:
        return exe.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return sys.executable


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("kronfluence", "traker", "dattri"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    main()
