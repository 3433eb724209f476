"""Per-token gradients (``analog(per_token=True)``) of Hugging Face LMs that normalise q and k per head.

Qwen3's q_norm/k_norm read (B, T, heads, head_dim), Gemma3's (B, heads, T, head_dim). analog logged their
"token_grad" with one row per (token, head) position — (B, T·heads, …) in Qwen3's order, (B, heads·T, …) in
Gemma3's — so per-token influence refused the query ("the same positions in every module") and the rows were
not per token. Now each token's share sums its heads (analog.capture.tokens).

References (no analog code): the batch-size-1 autograd loop for the per-example gradient (Σ_t of the shares),
and ``gated_token_grads`` for each share: autograd with each module's weights reaching the loss through one
(example, token) of its output, the gradient of a copy of the weights used at that token alone. A per-head
norm whose token axis cannot be told (as many heads as tokens; a first input without the tokens) is an error
naming it.
"""

import pytest
import torch
from capture_reference import analog_per_token, assert_grads_match, gated_token_grads, loop_per_sample, make_analog
from hf_lm_helpers import LM, hf_class, lm_config, lm_loss, padded, randomise_norms
from torch import nn

from analog.analysis import InfluenceFunction

pytest.importorskip("transformers")

B, T, V = 3, 6, 50
HEADS = 4  # lm_config's query heads
#: model class, config class, and the axis of the tokens in the output of q_norm/k_norm (1 elsewhere)
PER_HEAD = {"qwen3": ("Qwen3ForCausalLM", "Qwen3Config", 1), "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", 2)}


def build(name):
    """A tiny random model (untied lm_head: ``gated_token_grads`` needs each weight in one module), eval mode."""
    model_cls, config_cls, axis = PER_HEAD[name]
    model_cls, config_cls = hf_class(f"transformers.{model_cls}"), hf_class(f"transformers.{config_cls}")
    torch.manual_seed(0)
    model = LM(model_cls(lm_config(config_cls, V, head_dim=8, tie_word_embeddings=False)).eval())
    randomise_norms(model)
    return model, axis


def per_head(name: str) -> bool:
    return name.endswith(("q_norm", "k_norm"))


@pytest.mark.parametrize("name", list(PER_HEAD))
def test_token_grads_sum_to_the_example_and_match_gated_autograd(tmp_path, name):
    model, axis = build(name)
    ids, mask = padded(B, T, V)
    analog = make_analog(tmp_path)
    analog.watch(model)
    analog.eval()
    assert analog.coverage.complete, str(analog.coverage)
    heads = {n: m for n, m in analog.modules.items() if per_head(n)}
    assert len(heads) == 2
    got = analog_per_token(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    assert all(g.shape[:2] == (B, T) for g in got.values())  # one row per token in every module

    # Σ_t of the shares: the per-example gradient of every parameter
    ref = loop_per_sample(model, lm_loss, (ids, mask), (ids, mask))
    assert set(got) == set(ref)
    assert assert_grads_match({k: g.sum(1) for k, g in got.items()}, ref) == len(ref)

    # each share: autograd through one (example, token) of every module's output at a time
    watched = {n: (m, axis if per_head(n) else 1) for n, m in analog.modules.items()}
    shares = gated_token_grads(model, watched, lambda: lm_loss(model(ids, mask), ids, mask), (B, T))
    assert set(shares) == set(got)
    assert assert_grads_match(got, shares) == len(ref)
    for module_name in heads:  # not zeros against zeros: every real position but the last has a loss term
        assert shares[f"{module_name}.weight"][0, : T - 1].abs().amax(-1).min() > 0


@pytest.mark.parametrize("name", list(PER_HEAD))
def test_token_grads_without_a_mask_take_the_tokens_from_input_ids(tmp_path, name):
    """No mask: the token count is the length of the model's first input (input_ids, (B, T))."""
    model, _ = build(name)
    ids, mask = torch.randint(1, V, (2, T)), torch.ones(2, T, dtype=torch.long)
    analog = make_analog(tmp_path)
    analog.watch(model)
    analog.eval()
    without = analog_per_token(analog, lambda: lm_loss(model(ids, mask), ids, mask), 2)
    with_mask = analog_per_token(analog, lambda: lm_loss(model(ids, mask), ids, mask), 2, mask=mask)
    assert set(without) == set(with_mask)
    assert assert_grads_match(without, with_mask, atol=0, rtol=0) == len(with_mask)


@pytest.mark.parametrize("name", list(PER_HEAD))
def test_token_influence_of_a_per_head_norm_model(tmp_path, name):
    """Per-token influence runs on the whole model (it refused the uneven positions of q_norm/k_norm) and its
    per-token scores add up to the sequence scores."""
    model, _ = build(name)
    run = make_analog(tmp_path, save=True, hessian="kfac", compression={"type": "none"})
    run.watch(model)
    train_ids, train_mask = padded(B, T, V)
    with run(data_id=list(range(B)), mask=train_mask):
        lm_loss(model(train_ids, train_mask), train_ids, train_mask).backward()
    model.zero_grad(set_to_none=True)
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    query = torch.randint(1, V, (2, T))
    qmask = torch.ones_like(query)
    with run(mask=qmask, per_token=True):
        lm_loss(model(query, qmask), query, qmask).backward()
    tokens = run.influence.compute_token_influence(run.get_log())
    with run(mask=qmask):
        lm_loss(model(query, qmask), query, qmask).backward()
    sequence = run.influence.compute_influence_all(run.get_log()).scores
    assert tokens.scores.shape == (2, T, B)
    torch.testing.assert_close(tokens.sequence_scores(), sequence, rtol=1e-4, atol=1e-4)


def test_per_head_norm_with_as_many_heads_as_tokens_is_refused(tmp_path):
    """Qwen3's q_norm on (B, 4, 4, head_dim) with 4 heads: Σ over heads and Σ over tokens differ and nothing
    tells the axes apart, padding or not — an error naming the module; k_norm (2 heads) alone is fine."""
    model, _ = build("qwen3")
    ids, mask = torch.randint(1, V, (2, HEADS)), torch.ones(2, HEADS, dtype=torch.long)
    analog = make_analog(tmp_path)
    analog.watch(model)
    analog.eval()
    step = lambda: lm_loss(model(ids, mask), ids, mask)  # noqa: E731
    with pytest.raises(ValueError, match=r"'m.model.layers.0.self_attn.q_norm'.*\(4, 4\).*as many heads as tokens"):
        analog_per_token(analog, step, 2, mask=mask)
    fine = make_analog(tmp_path, project="fine")
    fine.watch(model, name_filter=["k_norm"])
    fine.eval()
    got = analog_per_token(fine, step, 2, mask=mask)
    assert list(got) == ["m.model.layers.0.self_attn.k_norm.weight"] and got[next(iter(got))].shape == (2, HEADS, 8)


class HeadNormNet(nn.Module):
    """x (B, T·H·4) -> (B, T, H, 4) (``heads_first``: (B, H, T, 4)) -> RMSNorm(4) per head -> Linear(4, 2): per-head
    layers behind a first input that does not show the tokens; ``lengths`` (B,) in front hides even its shape."""

    def __init__(self, t=5, h=3, heads_first=False):
        super().__init__()
        self.t, self.h, self.heads_first = t, h, heads_first
        self.norm, self.out = nn.RMSNorm(4), nn.Linear(4, 2)
        nn.init.normal_(self.norm.weight)

    def forward(self, *inputs):
        x = inputs[-1].reshape(inputs[-1].shape[0], self.t, self.h, 4)
        return self.out(self.norm(x.transpose(1, 2) if self.heads_first else x))


@pytest.mark.parametrize("lengths", [False, True], ids=["flat-input", "1d-first-input"])
def test_per_head_norm_without_a_token_count_is_refused_and_a_mask_gives_it(tmp_path, lengths):
    torch.manual_seed(0)
    model = HeadNormNet().eval()
    x = torch.randn(2, 5 * 3 * 4)
    inputs = (torch.tensor([5, 5]), x) if lengths else (x,)
    analog = make_analog(tmp_path)
    analog.watch(model)
    analog.eval()
    step = lambda: model(*inputs).pow(2).sum()  # noqa: E731
    why = "the token count is not known" if lengths else "none of its axes has the 60 tokens"
    with pytest.raises(ValueError, match=rf"module 'norm'.*\(5, 3\).*{why}.*mask=attention_mask"):
        analog_per_token(analog, step, 2)
    got = analog_per_token(analog, step, 2, mask=torch.ones(2, 5))
    ref = gated_token_grads(model, {"norm": (model.norm, 1), "out": (model.out, 1)}, step, (2, 5))
    assert got["norm.weight"].shape == (2, 5, 4)
    assert assert_grads_match(got, ref) == 3


def test_compiled_heads_first_token_grads(tmp_path):
    """Under torch.compile (the traced hook's backward path) a (B, heads, T, d) layout sums its heads per token."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HeadNormNet(heads_first=True).eval()
    x = torch.randn(2, 5 * 3 * 4)
    compiled = torch.compile(model, backend="aot_eager")
    analog = make_analog(tmp_path)
    analog.watch(model)
    analog.eval()
    got = analog_per_token(analog, lambda: compiled(x).pow(2).sum(), 2, mask=torch.ones(2, 5))
    ref = gated_token_grads(model, {"norm": (model.norm, 2), "out": (model.out, 2)}, lambda: model(x).pow(2).sum(),
                            (2, 5))
    assert assert_grads_match(got, ref) == 3
