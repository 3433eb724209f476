"""Markdown table and Pareto plot (quality against bytes per example) from ``run.py``'s JSON.

    python -m benchmarks.attribution_lm.report results.json [more.json ...] \
        --md benchmarks/results/attribution_lm.md --png benchmarks/results/attribution_lm.png

Several JSON files (e.g. a baseline run and a run of new options) are merged row by row; each row keeps
the run it came from. Ratios ("× ref") are against the reference row of the same run and task:
``none-ekfac`` at analog's default damping (uncompressed EK-FAC).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

REFERENCE = ("none-ekfac", None)
LM_COLS = ("recall@1", "recall@2", "recall@5", "recall@10", "mrr", "lds")


def load(paths: List[str]) -> List[dict]:
    runs = []
    for i, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        for row in data["rows"]:
            row["run"] = i
        runs.append(data)
    return runs


def _ref(rows, task, fallback=()):
    """The run's own reference row, else one of ``fallback`` (rows of other runs of the same preset)."""
    for r in list(rows) + list(fallback):
        if (r.get("task") == task and (r["method"], r.get("damping")) == REFERENCE and "error" not in r
                and r.get("mode", "dot") == "dot"):
            return r
    return None


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}"


def _bytes(v):
    if not v:
        return "0 (recomputes)"
    return f"{v / 1024:.1f} KiB" if v >= 1024 else f"{v:.0f} B"


def _label(row) -> str:
    lam, mode = row.get("damping"), row.get("mode", "dot")
    return row["method"] + ("" if lam is None else f" (λ={lam})") + ("" if mode == "dot" else f" [{mode}]")


def task_table(rows: List[dict], task: str, cols, fallback=()) -> List[str]:
    ref = _ref(rows, task, fallback)
    head = ["method", "bytes/example", "× smaller", "log step × plain", "fit (s)", "query (s)", *cols]
    if ref is not None:
        head += [f"{c} × ref" for c in ("recall@2", "lds") if c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("task") != task:
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        smaller = ref["bytes_per_example"] / r["bytes_per_example"] if ref and r.get("bytes_per_example") else None
        cells = [_label(r), _bytes(r.get("bytes_per_example")), _fmt(smaller, 1), _fmt(r.get("overhead"), 2),
                 _fmt(r.get("fit_s"), 2), _fmt(r.get("query_s"), 2), *[_fmt(r.get(c)) for c in cols]]
        if ref is not None:
            cells += [_fmt(r.get(c) / ref[c], 2) if r.get(c) is not None and ref.get(c) else "—"
                      for c in ("recall@2", "lds") if c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(runs: List[dict], path: Path, png: str = None, summary: str = None) -> None:
    lines = ["# Attribution quality against cost: fact tracing and LDS on a small LM, LDS on digits", ""]
    if summary:
        lines += [Path(summary).read_text().strip(), ""]
    if png:
        lines += [f"![Pareto plot]({png})", ""]
    for i, data in enumerate(runs):
        meta, tasks = data["meta"], data["tasks"]
        lines += [f"## Run {i + 1}: `{meta['command']}`", "", f"- machine: {meta['machine']}; started "
                  f"{meta['started']}"]
        if "lm" in tasks:
            t = tasks["lm"]
            m = t["model"]
            lines += [f"- LM: {m['n_layers']} layers, width {m['d_model']}, MLP {m['d_ff']}, "
                      f"{t['n_params']:,} parameters; {t['n_train']} training sequences of {t['corpus']['seq_len']} "
                      f"tokens; {t['n_queries']} fact queries, {t['n_sources']:.2f} source sequences each; "
                      f"fact accuracy of the trained model {t['fact_accuracy']:.3f} (answer loss "
                      f"{t['answer_loss']:.3f}); LDS target: {t['gt_subsets']} random halves × {len(t['gt_seeds'])} "
                      f"seeds, seed consistency {t['seed_consistency']:.3f}"]
        if "digits" in tasks:
            lines += [f"- digits: benchmarks/influence's MLP, {tasks['digits']['n_train']} train / "
                      f"{tasks['digits']['n_queries']} test, task damping λ = {tasks['digits']['damping']}"]
        rows = data["rows"]
        same = [r for other in runs if other["meta"]["preset"] == meta["preset"] for r in other["rows"]]
        if "lm" in tasks:
            lines += ["", "### Fact tracing and LDS on the LM", "", *task_table(rows, "lm", LM_COLS, same)]
        if "digits" in tasks:
            lines += ["", "### LDS on digits", "", *task_table(rows, "digits", ("lds",), same)]
        lines.append("")
    lines += NOTES
    path.write_text("\n".join(lines) + "\n")


NOTES = [
    "## Columns",
    "",
    "- **bytes/example**: size of the log store's row files ÷ training examples (float32); peers store nothing "
    "and recompute training gradients at every query. **× smaller**: uncompressed bytes ÷ this row's.",
    "- **log step × plain**: median over batches of forward + backward inside `with analog(...)` (storing pass) ÷ "
    "the same without analog, same batches, same machine. **fit**: `finalize()` (flush, curvature, EK-FAC "
    "correction / raw covariance from the store). **query**: query gradients + scoring all queries against the "
    "store (for peers: their scoring call, which recomputes training gradients; their fit is the factor fit).",
    "- **recall@k**: |top-k ∩ sources| ÷ |sources|, mean over queries (sources = the 2–3 sequences stating the "
    "queried fact; recall@1 ≤ 1/|sources|). **MRR**: reciprocal rank of the first source. **LDS**: Spearman "
    "over retrained halves of −Σ_{t∈S} score vs the query's answer loss, mean over queries.",
    "- **λ**: none = analog's default (0.1 × mean eigenvalue per module; Kronfluence's heuristic is the same "
    "rule); `task` = the task's absolute λ (digits: 1e-3, as benchmarks/influence).",
    "- **× ref**: ratio to `none-ekfac` (uncompressed EK-FAC, default damping, dot) of the same run, or of another"
    " run of the same preset when the run has none.",
]


def plot(runs: List[dict], path: Path) -> None:
    """One panel per (run, task, metric); colour = projection init, marker = curvature; front points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[tuple, List[dict]] = {}  # runs of the same preset on the same machine share a panel
    for data in runs:
        where = data["meta"]["machine"].split(" (")[0].split(",")[0]
        for task, metric in (("lm", "recall@2"), ("lm", "lds"), ("digits", "lds")):
            pts = [r for r in data["rows"] if r.get("task") == task and metric in r and "error" not in r]
            if pts:
                panels.setdefault((task, data["meta"]["preset"], where, metric), []).extend(pts)
    panels = [(pts, key[3], f"{key[0]} ({key[1]} preset, {key[2]}): {key[3]}") for key, pts in panels.items()]
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.0 * cols, 4.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (pts, metric, title) in zip(axes.flat, panels):
        stored = [r for r in pts if r.get("bytes_per_example")]
        for r in pts:
            if not r.get("bytes_per_example"):
                ax.axhline(r[metric], ls="--", c="gray", lw=1)
                ax.text(0.01, r[metric], _label(r), fontsize=7, color="gray", va="bottom",
                        transform=ax.get_yaxis_transform())
        for r in stored:
            hollow = r.get("mode", "dot") != "dot"
            ax.scatter(r["bytes_per_example"], r[metric], s=26, zorder=3, marker=_marker(r),
                       facecolors="none" if hollow else _color(r), edgecolors=_color(r))
        front = _pareto([(r["bytes_per_example"], r[metric], r) for r in stored])
        if front:
            ax.step([x for x, _, _ in front], [y for _, y, _ in front], where="post", c="k", lw=0.8, alpha=0.5)
            for x, y, r in front:
                ax.annotate(_label(r), (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per training example on disk (log)")
        ax.set_ylabel(metric)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=n) for n, c in COLORS.items()]
    handles += [plt.Line2D([], [], ls="", marker=m, color="k", label=f"hessian {h}") for h, m in MARKERS.items()]
    handles.append(plt.Line2D([], [], ls="", marker="o", mfc="none", color="k", label="cosine scores"))
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)


COLORS = {"uncompressed": "black", "random": "tab:blue", "pca": "tab:orange", "whiten": "tab:green",
          "whiten_pca": "tab:purple", "query": "tab:red", "dense": "tab:gray", "other": "tab:brown"}
MARKERS = {"ekfac": "o", "kfac": "s", "raw": "^", "none": "v", "diagonal": "d", "auto": "*"}


def _color(r) -> str:
    comp = r.get("config", {}).get("compression", {})
    if comp.get("type") == "none":
        return COLORS["uncompressed"]
    if comp.get("type") == "dense":
        return COLORS["dense"]
    return COLORS.get(comp.get("init", "random"), COLORS["other"])


def _marker(r) -> str:
    return MARKERS.get(str(r.get("config", {}).get("hessian", "none")), "*")


def _pareto(points) -> List[tuple]:
    """(x, y, row) not beaten by one that is both smaller and better, sorted by size."""
    best, front = -math.inf, []
    for x, y, row in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, row))
            best = y
    return front


def main(argv: Dict = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--md", default="benchmarks/results/attribution_lm.md")
    parser.add_argument("--png", default="benchmarks/results/attribution_lm.png")
    parser.add_argument("--summary", help="a markdown file put at the top (the findings, in words)")
    args = parser.parse_args(argv)
    runs = load(args.results)
    plot(runs, Path(args.png))
    write_markdown(runs, Path(args.md), Path(args.png).name, args.summary)
    print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
    main()
