"""The crash matrix: a logging process SIGKILLed at each point (or leaving without finalize()), then
this process appends what is missing and finalizes, and gets the curvature of an uninterrupted run
(to 1e-6) and its influence scores — for kfac, ekfac, raw and diagonal, and for float32 and int8 stores
(the default for LoGra: both runs store the same rows quantised the same way, so the same bounds hold)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analog import AnaLog
from analog.analysis import InfluenceFunction

sys.path.insert(0, str(Path(__file__).parent))
import crash_runner as cr  # noqa: E402  (the same model, batches and config as the killed children)

KINDS = ("kfac", "ekfac", "raw", "diagonal")
SIGKILL = 9


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Every (kind, point) scenario run once, in children of one runner process."""
    root = tmp_path_factory.mktemp("crashed")
    specs = [f"{k}:{p}:{d}" for k in KINDS for p in cr.POINTS for d in cr.FLUSH_BYTES]
    repo = str(Path(__file__).resolve().parents[2])  # this checkout's analog, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(Path(cr.__file__)), str(root), *specs],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return root, json.loads(done.stdout.splitlines()[-1])


def _log_missing(run, model):
    """Log the batches the store does not hold yet; returns how many were logged."""
    logged = 0
    for ids, x, y in cr.batches():
        if run.is_logged(ids):
            continue
        cr.log_batch(run, model, ids, x, y)
        logged += 1
    return logged


def _scores(run, model):
    x = torch.cos(torch.arange(12.0).reshape(2, 6))
    with run():
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2]), reduction="sum").backward()
    model.zero_grad()
    run.add_analysis({"influence": InfluenceFunction})
    result = run.influence.compute_influence_all(run.get_log())
    order = sorted(range(len(result.train_ids)), key=lambda j: result.train_ids[j])
    return [result.train_ids[j] for j in order], result.scores[:, order]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for kind in KINDS:
        for dtype in cr.FLUSH_BYTES:
            model = cr.make_model()
            run = AnaLog(f"ref-{kind}-{dtype}", cr.config(str(root), kind, dtype)).watch(model)
            assert _log_missing(run, model) == cr.BATCHES
            run.eval()
            assert len(list(run.log_path.glob("chunk_*.bin"))) == cr.BATCHES // 2  # a chunk every two batches
            model.eval()
            out[kind, dtype] = ({k: v.clone() for k, v in run.curvature.state.items()},
                                run.curvature.meta["n_samples"], _scores(run, model))
    return out


@pytest.mark.parametrize("dtype", list(cr.FLUSH_BYTES))
@pytest.mark.parametrize("point", cr.POINTS)
@pytest.mark.parametrize("kind", KINDS)
def test_recovery_reproduces_the_uninterrupted_run(crashed, uninterrupted, kind, point, dtype):
    root, ended = crashed
    expected_end = {"exit": 0} if point == "exit" else {"signal": SIGKILL}
    assert ended[f"{kind}:{point}:{dtype}"] == expected_end
    model = cr.make_model()
    run = AnaLog(f"{kind}-{point}-{dtype}", cr.config(str(root), kind, dtype)).watch(model)
    missing = _log_missing(run, model)
    assert run.open_store().header["dtype"] == dtype
    # mid_chunk: batch 6 was buffered and chunk 2 (batches 4, 5) perhaps still being written;
    # chunk_write: chunk 2's metadata was never written, so batches 4.. are missing
    assert missing in {"mid_chunk": (4, 6), "chunk_write": (6,)}.get(point, (0,))
    run.eval()
    model.eval()
    state, n, (ref_ids, ref_scores) = uninterrupted[kind, dtype]
    assert run.curvature.meta["n_samples"] == n == cr.BATCH * cr.BATCHES
    assert run.curvature.state.keys() == state.keys() and len(state) >= 2
    for key, value in state.items():
        torch.testing.assert_close(run.curvature.state[key], value, rtol=1e-6, atol=1e-9, msg=key)
    ids, scores = _scores(run, model)
    assert ids == ref_ids and len(ids) == n
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
