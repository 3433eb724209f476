"""The default ``watch`` on a zoo of tiny models (random init, built from configs, no download).

For each model:

1. coverage: what the default watch leaves out is exactly what the case expects (with the reason), a
   warning says so, and the covered parameter count equals the parameters whose gradients were logged;
2. exactness: every logged module's per-sample gradient (uncompressed) equals the batch-size-1 autograd
   loop (each example alone); tied uses are summed as autograd sums them;
3. the whole influence flow with the default compression (LoGra) and K-FAC: log two batches, finalize,
   query the training examples in analysis mode; each one's cosine score is highest for itself.
"""

import warnings

import pytest
import torch
from capture_reference import analog_per_sample, assert_grads_match, loop_per_sample, make_analog, tied_sums
from zoo_models import ZOO, B

from analog import AnaLog
from analog.analysis import InfluenceFunction

pytest.importorskip("transformers")


def sliced(mask, part):
    if mask is None:
        return None
    if isinstance(mask, dict):
        return type(mask)({k: v[part] for k, v in mask.items()})
    return mask[part]


def check_coverage(analog, case) -> None:
    coverage = analog.coverage
    assert str(coverage).startswith(f"analog watches {len(analog.modules)} modules")
    for suffix, word in case.uncovered.items():
        hits = [u for u in coverage.uncovered if suffix in u.module]
        assert hits and all(word in u.reason for u in hits), (suffix, coverage.uncovered)
    unexpected = [u for u in coverage.uncovered if not any(s in u.module for s in case.uncovered)]
    assert not unexpected, str(coverage)
    assert coverage.complete == (not case.uncovered)
    assert set(coverage.watched) == set(analog.modules)


@pytest.mark.parametrize("name", list(ZOO))
def test_default_watch(tmp_path, name):
    case = ZOO[name]()
    model = case.model
    analog = make_analog(tmp_path, project="exact")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analog.watch(model)
    assert any("not covered" in str(w.message) for w in caught) == bool(case.uncovered)
    check_coverage(analog, case)

    got = analog_per_sample(analog, lambda: case.loss(model(*case.inputs), *case.targets), B, mask=case.mask)
    ref = loop_per_sample(model, case.loss, case.inputs, case.targets)
    summed = tied_sums(model, got)
    assert assert_grads_match(summed, ref) == len(summed)
    assert sum(ref[k][0].numel() for k in summed) == analog.coverage.covered  # coverage = what was logged

    run = AnaLog("flow", {"root_dir": str(tmp_path), "hessian": "kfac", "progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.watch(model)
    for part in (slice(0, 2), slice(2, B)):
        with run(data_id=list(range(B))[part], mask=sliced(case.mask, part)):
            case.loss(model(*(x[part] for x in case.inputs)), *(y[part] for y in case.targets)).backward()
        model.zero_grad(set_to_none=True)
    run.eval()
    with run(mask=case.mask):
        case.loss(model(*case.inputs), *case.targets).backward()
    model.zero_grad(set_to_none=True)
    run.add_analysis({"influence": InfluenceFunction})
    scores = run.influence.compute_influence_all(run.get_log(), mode="cosine").scores
    assert scores.shape == (B, B)
    assert torch.equal(scores.argmax(1), torch.arange(B)), scores
