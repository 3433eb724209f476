"""Per-token influence on a Hugging Face GPT-2 with padding: the per-position scores add up to the
sequence score, padded positions score exactly zero, and unpadded positions do not."""

import pytest
import torch

from analog import AnaLog
from analog.analysis import InfluenceFunction
from analog.integrations.hf import causal_lm_loss, log_causal_lm, query_causal_lm

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=12,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()  # no dropout: passes must be repeatable
    seqs = torch.randint(1, 20, (12, 12))
    mask = torch.ones_like(seqs)
    mask[3, 8:], mask[7, 5:] = 0, 0
    run = AnaLog("tok", {"root_dir": str(tmp_path_factory.mktemp("tok")), "compression": {"rank": 4}})
    run.update({"hessian": "kfac"}).watch(model, name_filter=["transformer.h."])
    log_causal_lm(run, model, [{"input_ids": seqs[i : i + 4], "attention_mask": mask[i : i + 4],
                                "ids": list(range(i, i + 4))} for i in range(0, 12, 4)], progress=False)
    run.eval()
    run.add_analysis({"influence": InfluenceFunction})
    return run, model


def test_token_scores_sum_to_sequence_scores(gpt2_run):
    run, model = gpt2_run
    query = torch.randint(1, 20, (2, 12))
    mask = torch.ones_like(query)
    mask[1, 9:] = 0
    labels = query.masked_fill(mask == 0, -100)
    with run(mask=mask, per_token=True):
        causal_lm_loss(model(input_ids=query, attention_mask=mask).logits, labels).backward()
    model.zero_grad()
    tokens = run.influence.compute_token_influence(run.get_log())
    sequence = run.influence.compute_influence_all(query_causal_lm(run, model, query, mask)).scores
    assert tokens.scores.shape == (2, 12, 12)
    torch.testing.assert_close(tokens.sequence_scores(), sequence, rtol=1e-4, atol=1e-4)
    assert tokens.scores[1, 9:].abs().max() == 0  # padded positions carry no influence
    assert tokens.scores[1, :8].abs().min() > 0  # position 8 predicts a padded label: no loss term reaches it


def test_per_token_is_refused_while_logging(tmp_path):
    run = AnaLog("t", {"root_dir": str(tmp_path)}).watch(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="analysis mode"):
        with run(data_id=[0], per_token=True):
            pass
