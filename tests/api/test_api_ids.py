"""Ids: explicit ints/strings, or the inputs themselves, identified by a stable content hash."""

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from analog import AnaLog
from analog.ids import content_hash, to_ids
from analog.storage import LogStore

INPUTS = textwrap.dedent("""
    import torch
    def inputs():
        g = torch.Generator().manual_seed(7)
        return {"float": torch.randn(5, 3, 4, generator=g),
                "tokens": torch.randint(0, 50, (4, 9), generator=g),
                "half": torch.randn(3, 6, generator=g).half(),
                "scalars": torch.randn(4, generator=g)}
""")
_helpers: dict = {}
exec(INPUTS, _helpers)  # the same helpers in this process and in the child
inputs = _helpers["inputs"]


def reference_hash(row):
    """The documented id: first 16 hex digits of SHA-1 over dtype, shape and bytes."""
    row = row.contiguous()
    data = row.reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha1(f"{row.dtype}:{tuple(row.shape)}:".encode() + data).hexdigest()[:16]


def test_explicit_ids():
    assert to_ids([3, "a", np.int64(5)]) == [3, "a", 5]
    assert to_ids((1, 2)) == [1, 2]
    assert to_ids(torch.tensor([4, 5, 6])) == [4, 5, 6]
    assert to_ids(np.array([7, 8])) == [7, 8]
    assert all(type(i) is int for i in to_ids(np.array([7, 8])))


def test_content_hash_matches_the_documented_recipe_and_is_distinct():
    for name, x in inputs().items():
        ids = to_ids(x)
        assert ids == [reference_hash(r) for r in x], name
        assert len(set(ids)) == len(ids), f"distinct {name} rows must get distinct ids"
    x = inputs()["float"]
    assert to_ids(x[:2]) == to_ids(x)[:2], "an example's id does not depend on its batch"
    assert to_ids(x.transpose(1, 2).contiguous().transpose(1, 2)) == to_ids(x), "memory layout does not matter"
    assert content_hash(x[0]) != content_hash(x[0].double()), "dtype is part of the id"
    assert content_hash(x[0]) != content_hash(x[0].reshape(4, 3)), "shape is part of the id"
    assert content_hash(x[0]) == content_hash(x[0].clone())


def test_content_hash_is_the_same_in_another_process():
    code = INPUTS + "from analog.ids import to_ids\nfor k, v in sorted(inputs().items()):\n    print(k, *to_ids(v))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    theirs = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    ours = {k: to_ids(v) for k, v in inputs().items()}
    assert theirs == ours


def test_inputs_as_data_id_through_analog(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(36, 2))
    run = AnaLog("p", {"root_dir": str(tmp_path), "compression": {"rank": 2}, "segments": {"rule": "manual"}})
    run.watch(model)
    tokens = inputs()["tokens"]
    with run(data_id=tokens):
        model(tokens).sum().backward()
    assert run.get_log()[0] == to_ids(tokens)
    with pytest.raises(ValueError, match=f"id '{to_ids(tokens)[1]}' was already logged in segment 0"):
        with run(data_id=tokens[1:3]):
            model(tokens[1:3]).sum().backward()
    run.finalize()
    assert LogStore(run.log_path).ids == to_ids(tokens)
