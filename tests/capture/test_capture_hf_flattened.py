"""Layers that receive the batch flattened to (B·T, d) rows: OPT reshapes its hidden states (B, T, d) to
(B·T, d) before final_layer_norm, fc1 and fc2. The default watch raised "data_id has B ids but module
'...final_layer_norm' received a batch of B·T" at the first forward. With a (B, T) mask analog now reads row
b·T + t as position t of example b (analog.capture.hooks ``Capture._folded``), with one warning naming them.

References: the batch-size-1 autograd loop (per-sample gradients; OPT's tied lm_head/embed_tokens uses are
summed as autograd sums them), and for the statistics the K-FAC factors of the same sequences logged one at
a time without padding (the mask must keep the padded rows out of A and S of the flattened layers too).
"""

import warnings

import pytest
import torch
from capture_reference import analog_per_sample, assert_grads_match, loop_per_sample, make_analog, tied_sums
from hf_lm_helpers import LM, lm_loss, padded

from analog import AnaLog

tf = pytest.importorskip("transformers")

B, T, V = 3, 6, 40


def opt():
    torch.manual_seed(0)
    config = tf.OPTConfig(vocab_size=V, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=0)
    return LM(tf.OPTForCausalLM(config).eval())


FLAT = ["m.model.decoder.layers.0.final_layer_norm", "m.model.decoder.layers.0.fc1", "m.model.decoder.layers.0.fc2"]


def test_opt_flattened_layers_are_exact(tmp_path):
    model = opt()
    ids, mask = padded(B, T, V)
    analog = make_analog(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage: OPT's learned position embedding is left out
        analog.watch(model)
    assert set(FLAT) <= set(analog.modules)
    with pytest.warns(UserWarning, match=r"3 watched module\(s\) received the batch flattened.*final_layer_norm"):
        got = analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)
    got = tied_sums(model, got)
    ref = loop_per_sample(model, lm_loss, (ids, mask), (ids, mask))
    flat_params = [k for k in got if any(k.startswith(f + ".") for f in FLAT)]
    assert len(flat_params) == 6  # weight and bias of each
    assert assert_grads_match(got, ref) == len(got) == len(ref) - 1  # all but the position embedding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per module, not at every block
        analog_per_sample(analog, lambda: lm_loss(model(ids, mask), ids, mask), B, mask=mask)


def test_without_a_mask_the_error_says_to_pass_one(tmp_path):
    model = opt()
    ids, mask = padded(B, T, V)
    analog = make_analog(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analog.watch(model)
    with pytest.raises(ValueError, match=r"final_layer_norm.*received a batch of 18.*pass mask=attention_mask"):
        with analog(data_id=list(range(B))):
            lm_loss(model(ids, mask), ids, mask).backward()


def kfac_factors(tmp_path, project, model, batches):
    run = AnaLog(project, {"root_dir": str(tmp_path), "hessian": "kfac", "compression": {"type": "none"},
                           "save": False, "progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.watch(model, name_filter=FLAT)
    for i, (ids, mask) in enumerate(batches):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with run(data_id=[f"{i}-{j}" for j in range(ids.shape[0])], mask=mask):
                lm_loss(model(ids, mask), ids, mask).backward()
        model.zero_grad(set_to_none=True)
    run.finalize()
    return {k: v for k, v in run.curvature.state.items() if k.endswith("/A") or k.endswith("/S")}


def test_mask_keeps_padded_rows_out_of_the_factors(tmp_path):
    model = opt()
    ids, mask = padded(B, T, V)
    got = kfac_factors(tmp_path, "padded", model, [(ids, mask)])
    alone = [(ids[i:i + 1, :n], mask[i:i + 1, :n]) for i, n in enumerate(mask.sum(1).tolist())]
    ref = kfac_factors(tmp_path, "alone", model, alone)
    assert set(got) == set(ref) and len(ref) == 2 * len(FLAT)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-7, msg=key)
