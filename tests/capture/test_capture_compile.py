"""torch.compile on a model with more watched modules than Dynamo's recompile limit (8).

The modules all have different shapes, so any graph break at a hook would make Dynamo compile the
following module calls one frame per shape and hit ``recompile_limit``. analog's hook traces to two
opaque custom ops (analog.capture.compiled): the model compiles to one frame with no graph break, the
next blocks reuse it, and every logged gradient equals torch.func's. The ``aot_eager`` backend runs
the same Dynamo/AOTAutograd path as inductor without code generation (keeps the test short).
"""

import torch
from capture_reference import analog_per_sample, assert_grads_match, func_per_sample, make_analog
from torch import nn
from torch._dynamo.utils import counters

B = 4


def chain(n: int = 6) -> nn.Sequential:
    layers = []
    for i in range(n):  # Linear + LayerNorm of a new width each: 2n + 2 watched modules, all shapes distinct
        layers += [nn.Linear(6 + i, 7 + i), nn.LayerNorm(7 + i), nn.Tanh()]
    return nn.Sequential(nn.Embedding(11, 6), *layers, nn.Linear(6 + n, 3))


def loss_fn(out, y):
    return ((out - y) ** 2).sum()


def test_compiled_many_modules_one_graph(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, idx, y = chain(), torch.randint(0, 11, (B, 5)), torch.randn(B, 5, 3)
    ref = func_per_sample(model, loss_fn, (idx,), (y,))
    compiled = torch.compile(model, backend="aot_eager")
    analog = make_analog(tmp_path)
    analog.watch(model)
    assert len(analog.modules) == 14
    for _ in range(3):
        got = analog_per_sample(analog, lambda: loss_fn(compiled(idx), y), B)
        assert assert_grads_match(got, ref) == 2 * 6 * 2 + 2 + 1
        model.zero_grad()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == 1  # compiled once, reused by the next two blocks
    # outside a block the compiled model has no hooks: it recompiles without them and logs nothing
    loss_fn(compiled(idx), y).backward()
    assert all(not m._forward_hooks for m in model.modules())
