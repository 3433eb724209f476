"""torch.compile benchmark: a compiled logging step against the compiled plain step on a 30+-module model.

Model: an embedding, ``--blocks`` blocks of [Linear (a new width each), LayerNorm, GELU] and a head — with
the default 16 blocks that is 34 watched modules, all of different shapes (before analog's shared hook
and custom ops this hit Dynamo's recompile limit of 8 and ran eager). Steps (forward, backward with
``reduction="sum"``, zero_grad), each timed as the median of ``--steps`` after ``--warmup``:

* plain eager, plain compiled (inductor);
* logging eager and logging compiled: ``with analog(data_id=ids)`` around the step, LoGra rank 16,
  ``save=False``, ``hessian="kfac"`` (so per-sample gradients and factor statistics are computed).

Also reported: the first compiled call of each (compile time), Dynamo's frame/graph/graph-break
counts and any recompilation, and that the compiled and eager logs agree.

    PYTHONPATH=. python benchmarks/bench_compile.py    # writes benchmarks/results/compile.md
    python benchmarks/bench_compile.py --device cuda --batch 64 --tokens 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from analog import AnaLog

RESULTS = Path(__file__).parent / "results" / "compile.md"


def build(blocks: int, vocab: int = 512, width: int = 64) -> nn.Sequential:
    layers = [nn.Embedding(vocab, width)]
    d = width
    for i in range(blocks):
        layers += [nn.Linear(d, width + i), nn.LayerNorm(width + i), nn.GELU()]
        d = width + i
    return nn.Sequential(*layers, nn.Linear(d, 8))


def timed(step, steps: int, warmup: int, sync) -> tuple:
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build(args.blocks).to(dev)
    idx = torch.randint(0, 512, (args.batch, args.tokens), device=dev)
    y = torch.randn(args.batch, args.tokens, 8, device=dev)
    ids = list(range(args.batch))
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    compiled = torch.compile(model)
    tmp = tempfile.mkdtemp()
    run = AnaLog("bench", {"root_dir": tmp, "save": False, "hessian": "kfac", "progress": False,
                           "compression": {"type": "logra", "rank": 16}})
    run.watch(model)

    def plain(m):
        def step():
            ((m(idx) - y) ** 2).sum().backward()
            model.zero_grad(set_to_none=True)
        return step

    def logging(m):
        def step():
            with run(data_id=ids):
                ((m(idx) - y) ** 2).sum().backward()
            model.zero_grad(set_to_none=True)
        return step

    rows = {}
    rows["plain eager"] = timed(plain(model), args.steps, args.warmup, sync)
    rows["logging eager"] = timed(logging(model), args.steps, args.warmup, sync)
    eager_log = {n: k["grad"].clone() for n, k in run.get_log()[1].items()}
    rows["plain compiled"] = timed(plain(compiled), args.steps, args.warmup, sync)
    counters.clear()
    rows["logging compiled"] = timed(logging(compiled), args.steps, args.warmup, sync)
    dyn = {"frames": dict(counters["frames"]), "graphs": counters["stats"].get("unique_graphs", 0),
           "graph_breaks": sum(counters["graph_break"].values()), "recompiles": dict(counters["recompiles"])}
    compiled_log = run.get_log()[1]
    err = max(float((compiled_log[n]["grad"] - g).abs().max() / g.abs().max().clamp_min(1e-12))
              for n, g in eager_log.items())
    report(args, model, run, rows, dyn, err)


def report(args, model, run, rows, dyn, err) -> None:
    plain_c = rows["plain compiled"][1]
    lines = [
        "# torch.compile: compiled logging step vs compiled plain step", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""),
        f"Command: `PYTHONPATH=. python benchmarks/bench_compile.py --blocks {args.blocks} --batch {args.batch} "
        f"--tokens {args.tokens} --steps {args.steps} --device {args.device}`", "",
        f"Model: {len(run.modules)} watched modules (embedding, {args.blocks} × [Linear, LayerNorm] of distinct "
        f"widths, head), {sum(p.numel() for p in model.parameters()):,} parameters; batch {args.batch} × "
        f"{args.tokens} tokens; logging = LoGra rank 16 + K-FAC statistics, save=False.", "",
        "| step | first call (s) | median step (ms) | vs compiled plain |", "|---|---:|---:|---:|",
    ]
    for name, (first, med) in rows.items():
        lines.append(f"| {name} | {first:.2f} | {1e3 * med:.2f} | {med / plain_c:.2f}× |")
    lines += ["", f"Dynamo during the compiled logging steps: frames {dyn['frames']}, unique graphs {dyn['graphs']}, "
              f"graph breaks {dyn['graph_breaks']}, recompiles {dyn['recompiles'] or 'none'}.",
              f"Compiled vs eager logged gradients (last batch): max relative difference {err:.1e}.", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
