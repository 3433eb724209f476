"""A checkpointed segment's checkpoint does not depend on which rank's logs reach the store first (real gloo)."""

import torch
from distributed_helpers import errors, make_model, run_group
from segment_race_helpers import worker_late_rank0

from analog.trajectory.layout import load_records


def test_rank0_checkpoints_the_segment_even_when_rank1_flushed_first(tmp_path):
    root = tmp_path / "logs"
    codes = run_group(worker_late_rank0, tmp_path, root=str(root), timeout=60.0, pg_timeout=15.0)
    assert codes == [0, 0], f"exit codes {codes}\n{errors(tmp_path)}"
    records = load_records(root / "late")
    assert len(records) == 1 and records[0].checkpoint is not None, records[0].checkpoint
    saved = torch.load(tmp_path / "result_rank0.pt", weights_only=False)
    assert saved["checkpoint"] == records[0].checkpoint
    # the checkpoint holds the watched parameters as they were before the segment's first batch
    from analog.trajectory import load_checkpoint

    tensors = load_checkpoint(records[0].checkpoint_path(root / "late"), records[0].run, 0)
    model = make_model()
    compared = 0
    for name, value in tensors.items():
        module, _, param = name.rpartition(".")
        torch.testing.assert_close(value, getattr(model.get_submodule(module), param).detach())
        compared += 1
    assert compared == 4  # weight and bias of the two Linear layers
