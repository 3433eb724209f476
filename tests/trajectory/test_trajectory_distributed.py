"""Segments under a real 2-process gloo group: the seed loop over 2 epochs with each rank on its own
shard gives, on every rank, the scores of one process logging all the examples."""

import sys
from pathlib import Path

import torch
from trajectory_helpers import epoch_loop, loss_fn, make_data, make_mlp, segment_run, worker_segments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from distributed_helpers import errors, run_group  # noqa: E402


def test_two_ranks_log_segments_like_one_process(tmp_path):
    codes = run_group(worker_segments, tmp_path, root=str(tmp_path / "logs"))
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    results = [torch.load(tmp_path / f"result_rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[0]["run_id"] == results[1]["run_id"] and results[0]["segments"] == 2

    model, (x, y), (xq, yq) = make_mlp(), make_data(), make_data(n=3, seed=7)
    run = segment_run(tmp_path / "single", "one")
    run.watch(model)
    epoch_loop(run, model, x, y, [list(range(i, i + 4)) for i in range(0, len(x), 4)])
    run.eval()
    model.eval()
    query_fn = lambda: loss_fn(model(xq), yq)  # noqa: E731
    expected = {"tracin": run.trajectory.tracin_cp(query_fn),
                "wise": run.trajectory.segment_wise(query_fn, damping=0.1)}
    compared = 0
    for result in results:
        order = [result["train_ids"].index(i) for i in range(len(x))]
        for key, reference in expected.items():
            assert reference.train_ids == list(range(len(x)))
            torch.testing.assert_close(result[key][:, order], reference.scores, rtol=1e-4, atol=1e-4)
            compared += 1
    assert compared == 4
