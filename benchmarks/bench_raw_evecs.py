"""Raw curvature: scores with eigenvectors stored in float32 vs float64 (preconditioning in float64 both).

The digits MLP of benchmarks/influence/task.py (``wide``: 64 → 128 → 10, trained), 1000 training
examples logged with LoGra (float32 rows), 600 test queries. For each (rank, damping), one store is
fitted twice — ``Raw.EVECS_DTYPE`` float64 (what analog stored before) and float32 — and every
query is scored against every training example. Reported: max |Δ| / max |s64| over the score
matrix, the median and max over queries of ‖Δ‖ / ‖s64‖ of its row, and the mean overlap of each
query's top-10 training ids. As a yardstick, the same for the int8 store of the same logs against
the float32 store, both with float64 eigenvectors (analog's default storage for LoGra logs).

    python -m benchmarks.bench_raw_evecs
"""

from __future__ import annotations

import json
import tempfile
import warnings

import torch
import torch.nn.functional as F

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.hessian import build_curvature
from analog.hessian.simple import Raw
from benchmarks.influence.task import build_task


def log(task, root, rank, dtype):
    run = AnaLog(f"r{rank}-{dtype}", {"root_dir": root, "log": ["grad"], "save": True, "hessian": "none",
                                      "progress": False, "compression": {"type": "logra", "rank": rank},
                                      "storage": {"dtype": dtype}})
    model = task.fresh_model()
    run.watch(model)
    for start in range(0, task.n_train, 100):
        ids = list(range(start, min(start + 100, task.n_train)))
        with run(data_id=ids):
            F.cross_entropy(model(task.x_train[ids]), task.y_train[ids], reduction="sum").backward()
        model.zero_grad()
    run.eval()
    with run():
        F.cross_entropy(model(task.x_test), task.y_test, reduction="sum").backward()
    model.zero_grad()
    return run.open_store(), run.get_log()


def scores(store, query, dtype, damping):
    Raw.EVECS_DTYPE = dtype
    curvature = build_curvature("raw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N < k at rank 32
        curvature.finalize(store)
    return InfluenceFunction.from_parts(curvature, store, damping).compute_influence_all(query).scores.double()


def compare(ref, other):
    diff = other - ref
    rows = diff.norm(dim=1) / ref.norm(dim=1)
    top_ref, top_other = ref.topk(10, dim=1).indices, other.topk(10, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ref, top_other)) / (10 * len(ref))
    return {"max_abs_over_max": float(diff.abs().max() / ref.abs().max()), "row_rel_median": float(rows.median()),
            "row_rel_max": float(rows.max()), "top10_overlap": overlap}


def main():
    torch.set_num_threads(2)
    task = build_task("wide")
    with tempfile.TemporaryDirectory() as root:
        for rank in (16, 32):
            stores = {dtype: log(task, root, rank, dtype) for dtype in ("float32", "int8")}
            for damping in (None, 1e-3):
                store, query = stores["float32"]
                s64 = scores(store, query, torch.float64, damping)
                s32 = scores(store, query, torch.float32, damping)
                int8 = scores(*stores["int8"], torch.float64, damping)
                print(json.dumps({"rank": rank, "damping": damping, "n": len(store),
                                  "k": {f["module"]: int(torch.tensor(f["shape"]).prod()) for f in store.fields},
                                  "evecs_float32_vs_float64": compare(s64, s32),
                                  "int8_vs_float32_store": compare(s64, int8)}), flush=True)


if __name__ == "__main__":
    main()
