"""``analog demo``: attribution on scikit-learn's bundled digits (no download).

Trains a small MLP on 8×8 digits with a few training labels flipped, logs LoGra-compressed
per-sample gradients, fits EK-FAC, prints the most helpful and most harmful training examples for
a few test digits and how many flipped labels self-influence finds in its top 5 %, and writes a
report page.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from analog import AnaLog
from analog.analysis import InfluenceFunction, mislabel_detection
from analog.report.influence_page import influence_page


def load_digits_split(n_train: int, flip_fraction: float, seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - message for users without the demo extra
        raise SystemExit("the demo needs scikit-learn: pip install 'analog-ml[demo]'") from e
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    train, test = perm[:n_train], perm[n_train:]
    y_train = y[train].clone()
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flip_idx = torch.randperm(n_train, generator=gen)[: int(flip_fraction * n_train)]
    y_train[flip_idx] = (y_train[flip_idx] + torch.randint(1, 10, (len(flip_idx),), generator=gen)) % 10
    flipped[flip_idx] = True
    return x[train], y_train, flipped, x[test], y[test]


def train_model(x, y, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def run_demo(args) -> int:
    t0 = time.time()
    x, y, flipped, xq, yq = load_digits_split(args.n_train, args.flip, args.seed)
    model = train_model(x, y, args.epochs, args.seed).eval()  # logs and queries of the trained model, as in use
    with torch.no_grad():
        acc = (model(xq).argmax(1) == yq).float().mean().item()
    print(f"trained an MLP on {len(x)} digits ({int(flipped.sum())} labels flipped): test accuracy {acc:.3f}")

    root = args.root or str(Path(args.out) / "logs")
    shutil.rmtree(Path(root) / "digits", ignore_errors=True)  # the demo's own project: start afresh each run
    run = AnaLog(project="digits", config={"root_dir": root, "progress": True,
                                           "compression": {"type": "logra", "rank": args.rank}})
    run.update({"log": ["grad"], "hessian": "ekfac", "save": True})
    run.watch(model)
    t_log = time.time()
    for idx in tqdm(torch.arange(len(x)).split(args.batch_size), desc="logging gradients"):
        with run(data_id=idx):
            nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
        model.zero_grad()
    run.eval()
    store = run.open_store()
    print(f"logged {len(store)} examples x {len(store.modules)} modules, {store.row_bytes} bytes/example, "
          f"in {time.time() - t_log:.1f}s -> {run.log_path}")

    run.add_analysis({"influence": InfluenceFunction})
    queries = torch.arange(args.queries)
    with run():
        nn.functional.cross_entropy(model(xq[queries]), yq[queries], reduction="sum").backward()
    model.zero_grad()
    top = run.influence.compute_influence_all(run.get_log(), run.build_log_dataloader(512)).topk(args.k)

    ids, self_inf = run.influence.compute_self_influence(run.build_log_dataloader(512))
    order = torch.tensor(ids).argsort()
    found = mislabel_detection(self_inf[order], flipped, top_fraction=0.05)
    for q in range(args.queries):
        print(f"test digit {q} (label {int(yq[q])}): helpful {_describe(top['helpful'][q], y, flipped)}; "
              f"harmful {_describe(top['harmful'][q], y, flipped)}")
    summary = (f"Self-influence finds {found['found']} of {found['n_flipped']} flipped labels in its top 5 % "
               f"({found['k']} examples; AUC {found['auc']:.3f}).")
    print(summary)
    page = _write_page(args.out, x, y, flipped, xq, yq, top, self_inf[order], summary)
    print(f"report: {page.resolve()}  (total {time.time() - t0:.1f}s)")
    return 0


def _describe(train_ids, y, flipped) -> str:
    return ", ".join(f"#{i}(label {int(y[i])}{', flipped' if flipped[i] else ''})" for i in train_ids)


def _write_page(out, x, y, flipped, xq, yq, top, self_inf, summary) -> Path:
    img = lambda t: t.reshape(8, 8).numpy()  # noqa: E731
    train_item = lambda i: {"image": img(x[i]), "caption": f"#{i} label {int(y[i])}",  # noqa: E731
                            "flipped": bool(flipped[i])}
    queries = [{"image": img(xq[q]), "caption": f"test {q}, label {int(yq[q])}",
                "helpful": [train_item(i) for i in top["helpful"][q]],
                "harmful": [train_item(i) for i in top["harmful"][q]]} for q in range(len(top["helpful"]))]
    flagged = [train_item(int(i)) for i in self_inf.topk(min(100, max(1, len(self_inf) // 20))).indices]
    return influence_page(Path(out) / "report.html", "analog demo: influence on digits", queries, flagged, summary)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="influence demo on bundled digits (no download)")
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--flip", type=float, default=0.05, help="fraction of training labels flipped")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rank", type=int, default=16, help="LoGra rank per side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="log root directory (default: OUT/logs); its 'digits' "
                   "project is replaced on each run")
    p.add_argument("--out", default="outputs/demo", help="where report.html goes")
    p.set_defaults(func=run_demo)
