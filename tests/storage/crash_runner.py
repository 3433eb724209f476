"""Run logging scenarios in child processes that are killed with SIGKILL at a chosen point.

Used by test_storage_recovery.py as ``python crash_runner.py ROOT KIND:POINT:DTYPE ...``. The runner imports
torch and analog once, runs no tensor operation itself, and forks one child per scenario (a fresh
interpreter per child would cost seconds each). A child logs the shared batches into project
``KIND-POINT-DTYPE`` and sends itself SIGKILL at POINT — a real kill of a real process: no exception
handler, ``finally`` or ``atexit`` runs — except for ``exit``, where it leaves the interpreter
normally without calling ``finalize()``. The runner prints one JSON line: how each child ended.
"""

import json
import os
import signal
import sys

import torch
from torch import nn

import analog.state
import analog.storage.writer
from analog import AnaLog
from analog.hessian import Curvature

BATCH, BATCHES = 4, 10
POINTS = ("mid_chunk", "chunk_write", "before_fit", "state_write", "exit")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches():
    """(ids, x, y) of every batch; each example is a deterministic function of its id."""
    for b in range(BATCHES):
        ids = list(range(b * BATCH, (b + 1) * BATCH))
        k = torch.tensor(ids, dtype=torch.float32)[:, None]
        yield ids, torch.sin(k * 0.37 + torch.arange(6) * 1.3), torch.tensor(ids) % 3


#: the store dtypes of the matrix and their flush_bytes: a row holds 18 values in 2 fields (two modules'
#: grad logs), a batch 4 rows — float32 18 × 4 = 72 bytes a row, 288 a batch; int8 (the default for
#: LoGra) 2 × 4 + 18 = 26 bytes a row, 104 a batch — so that either writes a chunk every two batches
FLUSH_BYTES = {"float32": 500, "int8": 180}


def config(root, kind, dtype):
    return {"root_dir": root, "hessian": kind, "compression": {"rank": 3},
            "storage": {"dtype": dtype, "flush_bytes": FLUSH_BYTES[dtype]}, "progress": False}


def log_batch(run, model, ids, x, y):
    with run(data_id=ids):
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    model.zero_grad()


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(module, name, when):
    """Replace ``module.name`` by a wrapper that SIGKILLs the process when ``when(*args)`` is true."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        if when(*args):
            die()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def scenario(root, kind, point, dtype):
    torch.set_num_threads(1)
    model = make_model()
    run = AnaLog(f"{kind}-{point}-{dtype}", config(root, kind, dtype)).watch(model)
    if point == "chunk_write":  # the third chunk's rows are synced, its metadata never written
        calls = []
        kill_on_call(analog.storage.writer, "write_json_atomic",
                     lambda path, *a: path.name.startswith("chunk_") and (calls.append(path) or len(calls) == 3))
    for b, (ids, x, y) in enumerate(batches()):
        if point == "mid_chunk" and b == 7:  # batch 6 only buffered; the writer may be mid-chunk
            die()
        log_batch(run, model, ids, x, y)
    if point == "exit":
        sys.exit(0)  # normal exit without finalize(): the atexit handler flushes the writer
    if point == "before_fit":  # every chunk committed, the curvature not yet fitted
        kill_on_call(Curvature, "finalize", lambda *a: True)
    if point == "state_write":  # curvature.safetensors written, curvature.json not
        kill_on_call(analog.state, "write_bytes_atomic", lambda path, *a: path.name == "curvature.json")
    run.finalize()
    die()  # never reached for the points above


def main():
    root, specs = sys.argv[1], sys.argv[2:]
    ended = {}
    for spec in specs:
        kind, point, dtype = spec.split(":")
        pid = os.fork()
        if pid == 0:
            scenario(root, kind, point, dtype)
        _, status = os.waitpid(pid, 0)
        ended[spec] = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                       else {"exit": os.WEXITSTATUS(status)})
    print(json.dumps(ended))


if __name__ == "__main__":
    main()
