"""Hugging Face layers that look like registered ones but compute something else (tiny configs, random init).

* Gemma's and BART's word embeddings are ``nn.Embedding`` subclasses whose forward multiplies the lookup by
  a constant (√d): the plain embedding rule, inherited through the class hierarchy, logged δ without that
  factor (Gemma: per-sample gradients √d too small, no warning). They now have a rule of their own (every
  listed class: test_capture_rules.py). Gemma's RMSNorm computes (1 + w) x̂ and Olmo2's w x̂ in float32: they had no rule
  (coverage < 100 %). Reference: the batch-size-1 autograd loop.
* The other Hugging Face RMSNorm copies (Granite, SmolLM3, … — one class per model) are recognised by a probe
  of what they compute, x̂ ⊙ (w + c) for their own and a random weight; w² x̂ is not. So is Cohere's bias-free
  LayerNorm.
* Any other subclass of a registered layer that overrides ``forward`` keeps its base's rule only when a probe
  input shows the same output (Falcon's ``FalconLinear``); otherwise it is left out with that reason and
  refused when selected explicitly (BART's and Whisper's position embeddings, which look up positions
  rather than their input, crashed inside the embedding rule before; ConvNeXt's channels-first LayerNorms
  were logged with LayerNorm's rule and wrong by 100 %, silently).
* Per-head norms (q_norm/k_norm on (B, T, heads, head_dim) in Qwen3, (B, heads, T, head_dim) in Gemma3):
  a (B, T) padding mask was refused ("does not fit"), which broke the default watch with a mask. Now the
  mask is broadcast over the heads, and the K-FAC factors of the padded batch equal those of the same
  sequences logged unpadded one at a time; heads == T with padding is refused as ambiguous.
* BART's decoder cross-attention is named ``encoder_attn``: ``seq2seq_masks`` gave its queries the encoder
  mask (an error); names containing "decoder" now take the decoder mask first.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from capture_reference import analog_per_sample, assert_grads_match, loop_per_sample, make_analog, tied_sums
from hf_lm_helpers import LM, lm_config, lm_loss, padded, randomise_norms
from torch import nn

from analog import AnaLog
from analog.capture.masks import seq2seq_masks

tf = pytest.importorskip("transformers")

B, T, V = 3, 6, 50


MODELS = {
    "gemma": lambda: tf.GemmaForCausalLM(lm_config(tf.GemmaConfig, head_dim=8)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(lm_config(tf.Gemma2Config, head_dim=8)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(lm_config(tf.Gemma3TextConfig, head_dim=8)),
    "olmo2": lambda: tf.Olmo2ForCausalLM(lm_config(tf.Olmo2Config)),
    # unregistered RMSNorm copies, recognised by what they compute (analog.capture.norm.recognise_rms_norm)
    "granite": lambda: tf.GraniteForCausalLM(lm_config(tf.GraniteConfig)),
    "smollm3": lambda: tf.SmolLM3ForCausalLM(lm_config(tf.SmolLM3Config)),
    # a bias-free LayerNorm written out by hand (recognise_weight_only_layer_norm)
    "cohere": lambda: tf.CohereForCausalLM(lm_config(tf.CohereConfig)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, pad_token_id=0)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_default_watch_is_complete_and_exact(tmp_path, name):
    torch.manual_seed(0)
    model = LM(MODELS[name]().eval())
    randomise_norms(model)  # Gemma initialises its norms' w to 0 (scale 1 + w): make w matter
    ids, mask = padded(B, T, V)
    analog = make_analog(tmp_path)
    shared = len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.named_parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analog.watch(model)
    messages = [str(w.message) for w in caught]
    tied = [m for m in messages if "share one weight matrix" in m]  # tie_word_embeddings: cross terms left out
    assert len(tied) == int(shared) and len(messages) == len(tied), messages  # no coverage warning
    assert analog.coverage.complete, str(analog.coverage)
    got = tied_sums(model, analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask))
    ref = loop_per_sample(model, lm_loss, (ids, mask), (ids, mask))
    assert set(got) == set(ref)  # every parameter logged
    assert assert_grads_match(got, ref) == len(ref)
    if name == "falcon":  # FalconLinear overrides forward with x Wᵀ + b: the probe keeps Linear's rule
        kept = [n for n, m in analog.modules.items() if type(m).__name__ == "FalconLinear"]
        assert len(kept) == 4
    if name.startswith("gemma"):
        emb = "m.model.embed_tokens.weight"
        assert ref[emb].abs().max() > 1e-3
        scale = model.m.model.embed_tokens.embed_scale
        assert float(scale) == pytest.approx(32 ** 0.5)  # the factor the plain embedding rule left out


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class GoodRMSNorm(nn.Module):
    def __init__(self, d, offset=0.0, square=False):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), 1e-6
        self.offset, self.square = offset, square

    def forward(self, x):
        w = self.weight ** 2 if self.square else self.weight + self.offset
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class SquaredRMSNorm(GoodRMSNorm):  # w² x̂: equals w x̂ at w = 1, its own init; the random-weight probe tells
    def __init__(self, d):
        super().__init__(d, square=True)


@pytest.mark.parametrize("make,recognised", [(lambda: GoodRMSNorm(6), True), (lambda: GoodRMSNorm(6, 1.0), True),
                                             (lambda: SquaredRMSNorm(6), False)], ids=["w", "1+w", "w^2"])
def test_unregistered_rms_norm_recognised_by_probe(tmp_path, make, recognised):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), make(), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    before = model[1].weight.detach().clone()
    analog = make_analog(tmp_path)
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analog.watch(model)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model[1].weight, before)  # nothing moved
    assert ("1" in analog.modules) == recognised
    assert any("no per-sample rule for SquaredRMSNorm" in str(w.message) for w in caught) == (not recognised)
    x, y = torch.randn(B, T, 4), torch.randn(B, T, 2)
    loss = lambda out, t: ((out - t) ** 2).sum()  # noqa: E731
    got = analog_per_sample(analog, lambda: loss(model(x), y), B)
    ref = loop_per_sample(model, loss, (x,), (y,))
    assert assert_grads_match(got, ref) == (5 if recognised else 4)


def test_subclass_overriding_forward_is_left_out(tmp_path):
    model = nn.Sequential(DoubledLinear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    analog = make_analog(tmp_path)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="overrides forward"):
        analog.watch(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws from its own generator
    assert list(analog.modules) == ["2"]
    (u,) = analog.coverage.uncovered
    assert u.module == "0" and u.numel == 15 and "DoubledLinear subclasses Linear but overrides forward" in u.reason
    assert "checked on a probe input" in u.reason
    with pytest.raises(TypeError, match="'0'.*overrides forward"):
        make_analog(tmp_path, project="explicit").watch(model, name_filter=["0"])
    with pytest.raises(TypeError, match="'0'.*overrides forward"):
        make_analog(tmp_path, project="typed").watch(model, type_filter=[nn.Linear])


def kfac_state(tmp_path, project, model, batches):
    run = AnaLog(project, {"root_dir": str(tmp_path), "hessian": "kfac", "compression": {"type": "none"},
                           "save": False, "progress": False, "damping": 1e-3})
    run.watch(model)
    for i, (ids, mask, use_mask) in enumerate(batches):
        with run(data_id=[f"{i}-{j}" for j in range(ids.shape[0])], mask=mask if use_mask else None):
            lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
        model.zero_grad(set_to_none=True)
    run.finalize()
    return run.curvature.state


PER_HEAD = {  # q_norm/k_norm on (B, T, heads, head_dim) for Qwen3, on (B, heads, T, head_dim) for Gemma3
    "qwen3": lambda: tf.Qwen3ForCausalLM(lm_config(tf.Qwen3Config, head_dim=8)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(lm_config(tf.Gemma3TextConfig, head_dim=8)),
}


@pytest.mark.parametrize("name", list(PER_HEAD))
def test_per_head_norm_takes_the_padding_mask(tmp_path, name):
    torch.manual_seed(0)
    model = PER_HEAD[name]().eval()
    ids, mask = padded(B, T, V)
    padded_state = kfac_state(tmp_path, "padded", model, [(ids, mask, True)])
    lengths = mask.sum(1).tolist()
    alone = [(ids[i:i + 1, :n], mask[i:i + 1, :n], False) for i, n in enumerate(lengths)]
    ref_state = kfac_state(tmp_path, "alone", model, alone)
    assert set(padded_state) == set(ref_state)
    # the factors A and S themselves (their eigenvectors are arbitrary within the null space: 11 tokens, d = 32)
    factors = [k for k in ref_state if k.endswith("/A") or k.endswith("/S")]
    for key in factors:
        torch.testing.assert_close(padded_state[key], ref_state[key], rtol=1e-4, atol=1e-6, msg=key)
    assert len([k for k in factors if "q_norm" in k or "k_norm" in k]) == 4
    assert len(factors) == 2 * len(model_modules(model))


def model_modules(model):
    return [n for n, m in model.named_modules() if n and not list(m.children()) and list(m.parameters())]


def test_per_head_norm_mask_ambiguous_when_heads_equal_tokens(tmp_path):
    """(B, T, heads, head_dim) with heads == T: the token axis cannot be told, a padded mask is refused."""
    torch.manual_seed(0)
    model = PER_HEAD["qwen3"]().eval()
    n = 4  # = num_attention_heads
    ids, mask = torch.randint(1, V, (2, n)), torch.ones(2, n, dtype=torch.long)
    analog = make_analog(tmp_path, hessian="kfac")
    analog.watch(model)
    with analog(data_id=[0, 1], mask=mask):  # no padding: either axis gives the same statistics
        lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match=r"ambiguous for module 'model.layers.0.self_attn.q_norm'"):
        with analog(data_id=[2, 3], mask=mask):
            lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()


def test_bart_scaled_embeddings_exact_learned_positions_left_out(tmp_path):
    """BART's word embeddings scale by √d (rule registered); its learned position embeddings look up
    positions + 2, not their input: left out with the reason (they crashed one_hot before). The decoder's
    cross-attention queries take the decoder mask (their names contain "encoder_attn")."""
    config = tf.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                           max_position_embeddings=32, scale_embedding=True)
    torch.manual_seed(0)
    bart = tf.BartForConditionalGeneration(config).eval()

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bart

        def forward(self, ids, mask, dec):
            return self.m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits

    def loss(logits, labels):
        return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")

    model = Seq2Seq()
    ids, mask = padded(B, T, V)
    dec = torch.randint(1, V, (B, 4))
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="embed_positions"):
        analog.watch(model)
    reasons = {u.module: u.reason for u in analog.coverage.uncovered}
    assert set(reasons) == {"m.model.encoder.embed_positions", "m.model.decoder.embed_positions"}
    assert all("BartLearnedPositionalEmbedding subclasses Embedding but overrides forward" in r
               for r in reasons.values())
    assert type(analog.modules["m.model.encoder.embed_tokens"]).__name__ == "BartScaledWordEmbedding"
    masks = seq2seq_masks(mask, torch.ones(B, 4))
    got = tied_sums(model, analog_per_sample(analog, lambda: loss(model(ids, mask, dec), dec), B, mask=masks))
    ref = loop_per_sample(model, loss, (ids, mask, dec), (dec,))
    assert "m.model.shared.weight" in got and ref["m.model.shared.weight"].abs().max() > 1e-3
    assert assert_grads_match(got, ref) == len(ref) - 2  # all but the two position embeddings



def test_convnext_channels_first_layer_norm_left_out(tmp_path):
    """ConvNeXt's LayerNorm subclass normalises channels-first inputs (B, C, H, W) in its own forward: with
    LayerNorm's rule its per-sample gradients were wrong (100 % error, no warning). Its channels-first
    instances are now left out; the channels-last ones (inside each block) match LayerNorm on the probe and
    stay; everything logged equals the batch-size-1 loop."""
    config = tf.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
                               image_size=16, patch_size=2)
    torch.manual_seed(0)
    inner = tf.ConvNextForImageClassification(config).eval()

    class Images(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, x):
            return self.m(pixel_values=x).logits

    model = Images()
    analog = make_analog(tmp_path)
    with pytest.warns(UserWarning, match="not covered"):
        analog.watch(model)
    left_out = {u.module for u in analog.coverage.uncovered if "overrides forward" in u.reason}
    assert left_out == {"m.convnext.embeddings.layernorm", "m.convnext.encoder.stages.1.downsampling_layer.0"}
    kept = [n for n, m in analog.modules.items() if type(m).__name__ == "ConvNextLayerNorm"]
    assert kept == ["m.convnext.encoder.stages.0.layers.0.layernorm", "m.convnext.encoder.stages.1.layers.0.layernorm"]
    x, labels = torch.randn(B, 3, 16, 16), torch.tensor([0, 2, 1])

    def loss(logits, y):
        return F.cross_entropy(logits, y, reduction="sum")

    got = analog_per_sample(analog, lambda: loss(model(x), labels), B)
    ref = loop_per_sample(model, loss, (x,), (labels,))
    assert assert_grads_match(got, ref) == len(got) == 2 * len(analog.modules)  # weight and bias each
