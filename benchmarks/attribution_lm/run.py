"""Attribution quality against cost for every method, on the fact-tracing LM and on digits.

    python -m benchmarks.attribution_lm.run --preset gpu --device cuda --methods baseline --out results.json
    python -m benchmarks.attribution_lm.run --preset cpu --methods smoke            # a quick check here
    python -m benchmarks.attribution_lm.report results.json                       # table + Pareto plot

Steps: build the corpus; train the LM (``model.train_models``, seed 0, all sequences) and check that it
answers the facts; retrain on random halves for the LDS target (cached in ``--cache``); then for each
task (``lm``, ``digits``) run every analog method (``methods.py``; a JSON file with ``--methods-file``)
and every peer, each on a fresh copy of the same trained model. A method that fails gets a row with its
error and the run goes on. Writes one JSON file (rows + the settings, machine and command).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from benchmarks.attribution_lm import ground_truth, methods
from benchmarks.attribution_lm.corpus import CorpusConfig, build_corpus
from benchmarks.attribution_lm.harness import run_analog
from benchmarks.attribution_lm.model import ModelConfig, train_models
from benchmarks.attribution_lm.tasks import LMTask, build_digits

PRESETS = {
    # the benchmark (GPU): 8192 sequences (2× the 4096 numbers per module of LoGra r64), 2 layers, width 128
    "gpu": dict(corpus=CorpusConfig(), model=dict(d_model=128, d_ff=256, epochs=50, batch=128),
                subsets=100, seeds=(0,), chunk=100, ranks=(16, 64)),
    # the same design at CPU size (~15 min here with the LDS retraining, which is cached): 1024 sequences,
    # width 64; ranks 8 and 16 (LoGra r16 = 256 numbers per module, 4× fewer than the examples)
    "cpu": dict(corpus=CorpusConfig(n_entities=64, n_cities=16, n_foods=8, n_filler=128, n_train=1024, seq_len=16,
                                    n_queries=64),
                model=dict(d_model=64, n_heads=4, d_ff=128, epochs=30, batch=32), subsets=50, seeds=(0,), chunk=50,
                ranks=(8, 16)),
    # the CPU design with 4× the sequences (4096), so that every projection at the bytes of rank 16 in
    # float32 — rank 32 in int8 (1,024 numbers per module), rank 45 in int4 (2,025) — has k < N numbers per
    # module and ``raw``'s covariance is full rank (on ``cpu`` they are rank-deficient); ~40 min here
    "cpu4k": dict(corpus=CorpusConfig(n_entities=256, n_cities=32, n_foods=16, n_filler=128, n_train=4096,
                                      seq_len=16, n_queries=128),
                  model=dict(d_model=64, n_heads=4, d_ff=128, epochs=30, batch=32), subsets=50, seeds=(0,),
                  chunk=25, ranks=(16, 64)),
}


def build_lm(preset: str, device: str, cache: Path, progress: bool, overrides: dict,
             min_accuracy: float = 0.0) -> LMTask:
    """Corpus, trained LM (cached) and its retraining ground truth (cached). When the LM answers fewer than
    ``min_accuracy`` of the fact queries, it is trained once more with twice the epochs (the retraining
    for the LDS then uses those epochs too)."""
    p = {**PRESETS[preset], "model": {**PRESETS[preset]["model"], **overrides.get("model", {})},
         **{k: v for k, v in overrides.items() if k != "model"}}
    corpus = build_corpus(p["corpus"])
    cfg = ModelConfig(vocab=len(corpus.vocab), seq_len=p["corpus"].seq_len, **p["model"])
    task, train_s = _trained(corpus, cfg, p, preset, device, cache, progress)
    acc, loss = task.accuracy()
    if acc < min_accuracy:
        print(f"LM answers {acc:.3f} of the facts after {cfg.epochs} epochs: training with {2 * cfg.epochs}")
        cfg = dataclasses.replace(cfg, epochs=2 * cfg.epochs)
        task, train_s = _trained(corpus, cfg, p, preset, device, cache, progress)
        acc, loss = task.accuracy()
    key = _key(preset, p, cfg)
    gt_path = cache / f"lm_gt_{key}.npz"
    if gt_path.exists():
        gt = dict(np.load(gt_path))
    else:
        gt = ground_truth.retrain(corpus, cfg, p["subsets"], p["seeds"], device, p["chunk"], progress=progress)
        np.savez(gt_path, **{k: np.asarray(v) for k, v in gt.items()})
    task.ground_truth = gt
    task.info = {"train_s": train_s, "fact_accuracy": acc, "answer_loss": loss, "model": dataclasses.asdict(cfg),
                 "corpus": dataclasses.asdict(p["corpus"]), "n_params": sum(v.numel() for v in task.state.values()),
                 "gt_seconds": float(gt["seconds"]), "gt_subsets": int(gt["n_subsets"]),
                 "gt_seeds": [int(s) for s in gt["seeds"]], "seed_consistency": float(gt["seed_consistency"]),
                 "n_sources": float(np.mean([len(s) for s in corpus.sources]))}
    print(f"LM: fact accuracy {acc:.3f}, answer loss {loss:.3f}, seed consistency "
          f"{task.info['seed_consistency']:.3f} (train {train_s}, retrain {task.info['gt_seconds']:.0f} s)",
          flush=True)
    return task


def _key(preset, p, cfg) -> str:
    return f"{preset}_" + hashlib.sha1(repr((p["corpus"], cfg, p["subsets"], p["seeds"])).encode()).hexdigest()[:10]


def _trained(corpus, cfg, p, preset, device, cache: Path, progress):
    model_path = cache / f"lm_{_key(preset, p, cfg)}.pt"
    start = time.perf_counter()
    if model_path.exists():
        state, train_s = torch.load(model_path, map_location="cpu", weights_only=True), None
    else:
        model = train_models(cfg, corpus.train_tokens, [torch.arange(corpus.n_train)], [0], device,
                             progress=progress)[0]
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        train_s = time.perf_counter() - start
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(state, model_path)
    return LMTask("lm", corpus, cfg, state, None, device), train_s


def run_task(task, method_lists, root, save=lambda rows: None) -> list:
    from benchmarks.attribution_lm.peers import run_peer
    from benchmarks.attribution_lm.trajectory import run_trajectory

    rows = []
    jobs = [("peer", p) for p in method_lists["peers"]] + [("analog", m) for m in method_lists["analog"]]
    for family, spec in jobs:
        start = time.perf_counter()
        try:
            if family == "peer":
                new = [run_peer(task, spec)]
            elif "trajectory" in spec:  # segments through training (benchmarks/attribution_lm/trajectory.py)
                new = run_trajectory(task, spec, root)
            else:
                new = run_analog(task, spec, root)
        except Exception as err:  # one broken method must not cost the others' numbers
            traceback.print_exc()
            new = [{"method": spec["name"], "family": family, "error": f"{type(err).__name__}: {err}"}]
        for row in new:
            row["task"] = task.name
            quality = {k: round(v, 3) for k, v in row.items() if k.startswith(("recall", "mrr", "lds"))}
            print(f"[{task.name}] {row['method']} λ={row.get('damping')} {row.get('mode', '')}: "
                  f"{quality or row.get('error')} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        rows.extend(new)
        save(rows)
    return rows


def _plain(value):
    return float(value) if isinstance(value, np.floating) else str(value)


def machine(device: str) -> str:
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({cpu}); torch {torch.__version__}"
    return f"{cpu}, no GPU; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", nargs="+", default=["lm", "digits"], choices=["lm", "digits"])
    parser.add_argument("--methods", default="baseline", help=f"one of {sorted(methods.LISTS)}")
    parser.add_argument("--methods-file", help="JSON: a list of analog methods, or {analog: [...], peers: [...]}")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--cache", default="outputs/attribution_lm", help="trained LM + retraining cache")
    parser.add_argument("--workdir", default=None, help="where the logs of each method go (temporary)")
    parser.add_argument("--out", default="outputs/attribution_lm/results.json")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--epochs", type=int, help="override the preset's training epochs (tuning, checks)")
    parser.add_argument("--subsets", type=int, help="override the preset's number of retrained halves")
    parser.add_argument("--width", type=int, help="override the preset's model width (MLP: twice the width)")
    parser.add_argument("--seq-len", type=int, help="override the preset's sequence length (more filler)")
    parser.add_argument("--min-accuracy", type=float, default=0.0,
                        help="train once more with twice the epochs when the LM answers fewer facts than this")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty()
    lists = methods.load(args.methods, args.methods_file, ranks=PRESETS[args.preset]["ranks"])
    if args.no_peers:
        lists["peers"] = []
    meta = {"command": "python -m benchmarks.attribution_lm.run " + " ".join(sys.argv[1:]),
            "machine": machine(args.device), "preset": args.preset, "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())}
    rows, tasks = [], {}

    def write(all_rows):  # after every method, so that a run cut short keeps what it measured
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "tasks": tasks, "rows": all_rows}, indent=1, default=_plain))

    for name in args.tasks:
        if name == "lm":
            model = {k: v for k, v in (("epochs", args.epochs), ("d_model", args.width)) if v}
            if args.width:
                model["d_ff"] = 2 * args.width
            overrides = {"model": model, **({"subsets": args.subsets} if args.subsets else {})}
            if args.seq_len:
                overrides["corpus"] = dataclasses.replace(PRESETS[args.preset]["corpus"], seq_len=args.seq_len)
            task = build_lm(args.preset, args.device, Path(args.cache), progress, overrides, args.min_accuracy)
            tasks["lm"] = {**task.info, "n_train": task.n_train, "n_queries": task.n_queries}
        else:
            task = build_digits("cpu")  # as benchmarks/influence runs it (its ground truth is CPU-trained)
            tasks["digits"] = {"n_train": task.n_train, "n_queries": task.n_queries, "damping": task.damping}
        rows += run_task(task, lists, args.workdir, save=lambda new, done=list(rows): write(done + new))
    write(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
