"""Markdown report for ``run.py``'s numbers (the JSON beside it keeps the raw values)."""

from __future__ import annotations

from pathlib import Path

NOTES = """\
- **LDS** (Linear Datamodeling Score): for each test example q, the Spearman correlation over the M subsets
  between −Σ_{t∈S_m} score(q, t) and q's cross-entropy loss after retraining on S_m (mean over seeds), then
  the mean over test examples. Random scores give ≈ 0; the seed-consistency line above is a rough ceiling.
- **Scores** are all converted to analog's convention: n_test × n_train, score(q, t) = g_qᵀ(H + λI)⁻¹g_t,
  positive = t helps q. Kronfluence returns query × train, TRAK and dattri train × query (transposed
  here); all three peers' native sign is already positive = helps (their LDS is positive as returned).
- **Damping**: the same absolute λ for every method, added to the curvature of the *mean* training loss
  (= the L2 coefficient of the training objective). TRAK has no such damping (its own XᵀX on projected
  features, `lambda_reg=0`) and measures the correct-class margin instead of the loss.
- **Curvature**: Kronfluence fits the true Fisher (labels sampled from the model) unless marked
  *empirical*; dattri uses the exact Hessian, which on this ReLU network has negative eigenvalues below −λ,
  so the explicit solve is near-singular (low LDS) while truncated CG is implicitly regularised;
  `exact-fisher` is the explicitly formed empirical Fisher (the uncompressed reference for analog's `raw`).
- **analog** fits its curvature on the logged gradients, i.e. the *empirical* Fisher (block-diagonal over
  modules); at the same absolute λ its EK-FAC therefore matches Kronfluence's empirical EK-FAC (0.490 both
  in the run above). This model fits its training set, so the empirical Fisher is tiny (mean eigenvalue
  ~4e-5) and λ = 1e-3 swamps it. Rows marked `-heuristic` use analog's default damping instead,
  0.1 × mean eigenvalue per module. `logra-rN` rows store LoGra-projected gradients (rank N per side;
  `pca` = projections from a first PCA pass), 8–16× smaller than the full gradients of this small MLP.
- **Wall time**: fit + score in a fresh process (task built and libraries imported before the clock);
  **peak RSS** is the process's high-water mark (python + torch + task ≈ the `base` column), **ΔRSS** the
  part above it. Ratios are against the reference method: time ÷ reference time, ΔRSS ÷ reference ΔRSS.
"""


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def _ratio(x, ref):
    return "—" if x is None or not ref else f"{x / ref:.2f}×"


def write_report(payload: dict, path: Path) -> None:
    meta, results = payload["meta"], payload["results"]
    ref_name = meta["reference"]
    gt = meta["ground_truth"]
    lines = [
        "# Influence benchmark: analog and its peers",
        "",
        f"Task `{meta['task']['name']}`: sklearn digits, {meta['task']['n_train']} train / "
        f"{meta['task']['n_test']} test, MLP 64→{meta['task']['hidden']}→10, full-batch Adam "
        f"({meta['task']['steps']} steps, L2 {meta['task']['weight_decay']}). Damping λ = {meta['damping']}. "
        f"Ground truth: {gt['n_subsets']} subsets of {gt['alpha']:.0%} of train × {len(gt['seeds'])} seeds; "
        f"seed consistency (Spearman of one seed vs the others' mean) {gt['seed_consistency']:.3f}.",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, python {meta['python']}, "
        f"{meta['threads']} torch thread(s); "
        + ", ".join(f"{k} {v}" for k, v in meta["peer_versions"].items())
        + f"; TRAK proj_dim {meta['trak_proj_dim']}, dattri CG {meta['dattri_cg_iterations']} iterations "
        f"on test batches of {meta['dattri_cg_test_batch']}; "
        f"{meta['repeat']} fresh process(es) per method (median time, mean LDS).",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"## All test examples as queries (reference: `{ref_name}`)",
        "",
        "| method | family | LDS | wall (s) | time × ref | peak RSS (MB) | base (MB) | ΔRSS (MB) | ΔRSS × ref |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ref = results["all"].get(ref_name, {})
    for name, r in results["all"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['family']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['family']} | {_fmt(r['lds'])} | {_fmt(r['wall_s'], '.2f')} | "
            f"{_ratio(r['wall_s'], ref.get('wall_s'))} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{_fmt(r['peak_rss_mb'] - r['delta_rss_mb'], '.0f')} | {_fmt(r['delta_rss_mb'], '.0f')} | "
            f"{_ratio(r['delta_rss_mb'], ref.get('delta_rss_mb'))} |"
        )
    n_batches = meta["task"]["n_query_batches"]
    lines += [
        "",
        f"## Repeated queries: one training set, {n_batches} query batches (reference: `{ref_name}`)",
        "",
        f"Wall time covers fitting once and scoring all {n_batches} batches; LDS is of the concatenated scores.",
        "",
        "| method | family | LDS | wall (s) | time × ref | peak RSS (MB) | ΔRSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ref = results["repeated"].get(ref_name, {})
    for name, r in results["repeated"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['family']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['family']} | {_fmt(r['lds'])} | {_fmt(r['wall_s'], '.2f')} | "
            f"{_ratio(r['wall_s'], ref.get('wall_s'))} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{_fmt(r['delta_rss_mb'], '.0f')} |"
        )
    lines += ["", "## Notes", "", NOTES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
