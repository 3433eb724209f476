"""Tied weights (GPT-2's ``wte`` and ``lm_head`` share one (V, D) matrix W): what analog's scores leave out.

Each watched module logs its own use of W (``wte``: Σ_t e_{i_t} δ_tᵀ read as (D, V); ``lm_head``: Σ_t δ_t a_tᵀ,
(V, D)), while the per-sample gradient of W is their sum. With ``compression: none`` and ``hessian: none`` a
score is a plain gradient dot product, so analog's score is Σ_m ⟨q_m, g_m⟩ and the exact score ⟨q, g⟩ of the
tied model differs by the cross terms ⟨q_wte, g_head⟩ + ⟨q_head, g_wte⟩. The tests check that analog warns at
``watch`` exactly when two watched modules share a parameter, and that its scores equal the exact scores
(batch-size-1 autograd loop on the tied model, where W appears once) minus those cross terms (torch.func with
``tie_weights=False``), so the warning's claim and the measured size of the gap stay true.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from capture_reference import func_per_sample, loop_per_sample, make_analog
from hf_lm_helpers import LM

from analog.analysis import InfluenceFunction

transformers = pytest.importorskip("transformers")

V, T, N_TRAIN, N_QUERY = 48, 8, 8, 4
WTE, HEAD = "m.transformer.wte", "m.lm_head"


def gpt2(tied: bool = True, seed: int = 0, layers: int = 1, width: int = 16) -> LM:
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=V, n_positions=32,
                                     tie_word_embeddings=tied, attn_implementation="eager")  # eager: vmap-able
    torch.manual_seed(seed)
    return LM(transformers.GPT2LMHeadModel(config).eval())


def lm_loss(logits, ids, mask):
    """Next-token cross-entropy summed over the positions of each example (no padding here)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")


def watch_recording(analog, model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analog.watch(model, **kw)
    return [str(w.message) for w in caught if "share one weight matrix" in str(w.message)]


def test_tied_gpt2_warns_naming_the_modules_and_untied_does_not(tmp_path):
    tied = gpt2(tied=True)
    assert tied.m.lm_head.weight is tied.m.transformer.wte.weight
    analog = make_analog(tmp_path / "tied")
    messages = watch_recording(analog, tied)
    assert analog.coverage.tied == {f"{WTE}.weight": (WTE, HEAD)}
    assert len(messages) == 1
    assert f"{WTE} and {HEAD} share {WTE}.weight" in messages[0] and "cross terms" in messages[0]
    assert f"exclude=['{WTE}']" in messages[0]
    assert "tied: m.transformer.wte.weight is used by" in str(analog.coverage)

    untied = gpt2(tied=False)
    assert untied.m.lm_head.weight is not untied.m.transformer.wte.weight
    analog = make_analog(tmp_path / "untied")
    assert watch_recording(analog, untied) == [] and analog.coverage.tied == {}

    analog = make_analog(tmp_path / "one_use")  # as the warning advises: one use, nothing shared among the watched
    assert watch_recording(analog, tied, exclude=[WTE]) == [] and analog.coverage.tied == {}
    assert HEAD in analog.modules and analog.coverage.complete  # W is still covered, through lm_head's use alone


def analog_scores(model, tmp_path, train, query):
    """Scores (N_QUERY, N_TRAIN) of plain gradient dot products over every watched module."""
    analog = make_analog(tmp_path, save=True)
    analog.update({"log": ["grad"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied warning, checked above
        analog.watch(model)
    mask = torch.ones_like(train)
    with analog(data_id=list(range(len(train)))):
        lm_loss(model(train, mask), train, mask).backward()
    model.zero_grad()
    analog.eval()
    analog.add_analysis({"influence": InfluenceFunction})
    mask = torch.ones_like(query)
    with analog():
        lm_loss(model(query, mask), query, mask).backward()
    model.zero_grad()
    return analog.influence.compute_influence_all(analog.get_log()).scores.double()


def flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1).double() for g in grads.values()], 1)


#: (seed, layers, width, measured relative error ‖S_analog − S_exact‖ / ‖S_exact‖), as the README states them
MEASURED = [(0, 1, 16, 0.129), (1, 1, 16, 0.128), (2, 1, 16, 0.142), (0, 2, 32, 0.094)]


@pytest.mark.parametrize("seed,layers,width,measured", MEASURED)
def test_scores_equal_the_exact_scores_minus_the_cross_terms(tmp_path, seed, layers, width, measured):
    model = gpt2(tied=True, seed=seed, layers=layers, width=width)
    gen = torch.Generator().manual_seed(seed + 1)
    train, query = torch.randint(0, V, (N_TRAIN, T), generator=gen), torch.randint(0, V, (N_QUERY, T), generator=gen)
    got = analog_scores(model, tmp_path, train, query)

    # exact: the tied model's parameters, W once (batch-size-1 autograd, param.grad sums both uses)
    ones = lambda x: torch.ones_like(x)  # noqa: E731
    exact_q = loop_per_sample(model, lm_loss, (query, ones(query)), (query, ones(query)))
    exact_t = loop_per_sample(model, lm_loss, (train, ones(train)), (train, ones(train)))
    assert f"{HEAD}.weight" not in exact_q and len(exact_q) == len(dict(model.named_parameters()))
    exact = flat(exact_q) @ flat(exact_t).T
    # the uses separated (torch.func, tie_weights=False): the cross terms between wte's and lm_head's uses
    use_q = func_per_sample(model, lm_loss, (query, ones(query)), (query, ones(query)), tie_weights=False)
    use_t = func_per_sample(model, lm_loss, (train, ones(train)), (train, ones(train)), tie_weights=False)
    e, h = f"{WTE}.weight", f"{HEAD}.weight"
    dot = lambda a, b: a.flatten(1).double() @ b.flatten(1).double().T  # noqa: E731
    cross = dot(use_q[e], use_t[h]) + dot(use_q[h], use_t[e])

    assert got.shape == exact.shape == (N_QUERY, N_TRAIN)  # 32 scores compared
    torch.testing.assert_close(got + cross, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    relative = float((got - exact).norm() / exact.norm())
    assert abs(relative - measured) < 0.005, relative  # the size the warning and the README state
