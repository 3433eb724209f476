"""Method lists: each analog method is a plain analog config dict (see ``harness.py``), each peer a dict.

``--methods NAME`` picks a list below; ``--methods-file FILE.json`` reads ``{"analog": [...], "peers": [...]}``
(or a list of analog methods), so a new compression init, curvature or option is benchmarked by writing
its config, with no change to the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

NONE = {"type": "none"}


def logra(rank: int, init: str = "random") -> Dict[str, Any]:
    return {"type": "logra", "rank": rank, "init": init, "seed": 0}


def method(name: str, compression: Dict[str, Any], hessian: str, **extra) -> Dict[str, Any]:
    return {"name": name, "config": {"compression": compression, "hessian": hessian}, **extra}


def baseline(ranks=(16, 64)) -> List[Dict[str, Any]]:
    """Today's methods: the uncompressed reference and LoGra at ``ranks``, random/pca, ekfac/kfac/raw."""
    out = [
        method("none-ekfac", NONE, "ekfac", dampings=[None, "task"]),
        method("none-kfac", NONE, "kfac"),
        method("none-identity", NONE, "none"),
    ]
    for rank in ranks:
        for init in ("random", "pca"):
            for hessian in ("ekfac", "kfac", "raw"):
                out.append(method(f"logra-r{rank}-{init}-{hessian}", logra(rank, init), hessian,
                                  dampings=[None, "task"] if (rank, hessian) == (16, "raw") else [None]))
        out.append(method(f"logra-r{rank}-random-identity", logra(rank), "none"))
    return out


def sweep(ranks=(8, 16, 32, 64)) -> List[Dict[str, Any]]:
    """Every rank and curvature today offers, dense projections (256 and 1024 numbers per module) included."""
    out = baseline(ranks)
    for dim in (256, 1024):
        out.append(method(f"dense-d{dim}-raw", {"type": "dense", "rank": dim, "seed": 0}, "raw"))
    return out


def whiten(ranks=(16, 64)) -> List[Dict[str, Any]]:
    """The baseline plus LoGra ``init: whiten`` / ``whiten_pca`` (K-FAC whitening folded into the projections)
    with no curvature, ``raw`` and ``ekfac`` in the compressed space."""
    out = baseline(ranks)
    for rank in ranks:
        for init in ("whiten", "whiten_pca"):
            for hessian, label in (("none", "identity"), ("raw", "raw"), ("ekfac", "ekfac")):
                out.append(method(f"logra-r{rank}-{init}-{label}", logra(rank, init), hessian))
    return out


def final(ranks=(16, 64)) -> List[Dict[str, Any]]:
    """``whiten`` plus: cosine scores next to dot products, whitening under K-FAC, and ranks allocated by
    the spectra under the same byte budget (``allocate: spectrum``)."""
    cosine = {"modes": ["dot", "cosine"]}
    out = [dict(m, **cosine) if m["name"] in ("none-ekfac",) or m["name"].endswith("-raw") else m
           for m in whiten(ranks)]
    for rank in ranks:
        out.append(method(f"logra-r{rank}-whiten-kfac", logra(rank, "whiten"), "kfac", **cosine))
        for init in ("pca", "whiten_pca"):
            out.append(method(f"logra-r{rank}-{init}-spectrum-raw", {**logra(rank, init), "allocate": "spectrum"},
                              "raw"))
    return out


def query(ranks=(16, 64)) -> List[Dict[str, Any]]:
    """LoGra ``init: query`` (projections onto the whitened directions of a sample of queries other than
    the evaluated ones, ``calibration``: heldout = same kind of query, other = other relations) against
    random and whitened projections, each at ``ranks`` in float32 and in int8 (rank 16: at twice the rank,
    the same bytes: (2r)² int8 numbers + a 4-byte scale ≈ r² float32 numbers per module)."""
    int8 = {"storage": {"dtype": "int8"}}
    out = [method("none-ekfac", NONE, "ekfac"), method("none-kfac", NONE, "kfac")]
    for rank in ranks:
        out.append(method(f"logra-r{rank}-random-kfac", logra(rank), "kfac"))
        out.append(method(f"logra-r{rank}-random-raw", logra(rank), "raw"))
        out.append(method(f"logra-r{rank}-whiten-raw", logra(rank, "whiten"), "raw"))
        out.append(method(f"logra-r{rank}-query-raw", logra(rank, "query"), "raw"))
        out.append(method(f"logra-r{rank}-query-kfac", logra(rank, "query"), "kfac"))
        out.append(method(f"logra-r{rank}-query-identity", logra(rank, "query"), "none"))
        out.append(method(f"logra-r{rank}-query-raw-other", logra(rank, "query"), "raw", calibration="other"))
        # int8: at rank 16 twice the rank (the bytes of float32 rank 16), at larger ranks the same rank
        # (a quarter of the bytes; twice rank 64 would give raw a 16384² covariance per module)
        stored = 2 * rank if rank <= 16 else rank
        for init in ("random", "whiten", "query"):
            m = method(f"logra-r{stored}-{init}-raw-int8", logra(stored, init), "raw")
            m["config"].update(int8)
            out.append(m)
    return out


def smoke(ranks=None) -> List[Dict[str, Any]]:
    return [method("none-ekfac", NONE, "ekfac"), method("logra-r16-random-raw", logra(16), "raw"),
            method("logra-r16-pca-ekfac", logra(16, "pca"), "ekfac")]


def trajectory(ranks=(16, 64), segments=(4,)) -> List[Dict[str, Any]]:
    """Final-model methods against the same configs through the training trajectory (``trajectory.py``):
    segment-wise curvature (one per segment) and TracIn-CP (no curvature), K checkpoints each."""
    rank = 16 if 16 in ranks else ranks[0]
    configs = [("none", NONE), (f"logra-r{rank}-random", logra(rank))]
    out = []
    for label, compression in configs:
        out += [method(f"{label}-ekfac", compression, "ekfac"), method(f"{label}-identity", compression, "none")]
        for k in segments:
            out.append(method(f"traj{k}-{label}-ekfac", compression, "ekfac",
                              trajectory={"segments": k, "score": "segment_wise"}))
            out.append(method(f"traj{k}-{label}-tracin", compression, "none",
                              trajectory={"segments": k, "score": "tracin_cp"}))
    return out


PEERS = [{"name": "kronfluence-ekfac", "strategy": "ekfac"},
         {"name": "kronfluence-ekfac-empirical", "strategy": "ekfac", "empirical": True}]

LISTS = {"baseline": baseline, "sweep": sweep, "whiten": whiten, "final": final, "query": query, "smoke": smoke,
         "trajectory": trajectory}


def load(name: str = "baseline", path: str = None, ranks=(16, 64)) -> Dict[str, List[Dict[str, Any]]]:
    """{"analog": [...], "peers": [...]} from a named list (at the preset's ``ranks``) or a JSON file."""
    if path is None:
        if name not in LISTS:
            raise KeyError(f"unknown method list {name!r}; known: {sorted(LISTS)}")
        return {"analog": LISTS[name](ranks), "peers": list(PEERS)}
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        data = {"analog": data, "peers": list(PEERS)}
    for m in data.get("analog", []):
        if "name" not in m or "config" not in m:
            raise ValueError(f"{path}: every analog method needs 'name' and 'config', got {m}")
    return {"analog": data.get("analog", []), "peers": data.get("peers", list(PEERS))}
