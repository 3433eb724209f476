"""AnaLogTrainer: a real transformers.Trainer logs a finite, non-zero gradient for every training
example once, under the id its batch carried, and the curvature counts every example."""

import pytest
import torch

from analog import AnaLog

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")


def collate(rows):
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids, "ids": [r["id"] for r in rows]}


def test_trainer_logs_each_example_once_with_its_id(tmp_path):
    from analog.integrations.hf import AnaLogTrainer

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": row, "id": f"seq{i}"} for i, row in enumerate(torch.randint(0, 32, (8, 8)))]
    run = AnaLog("trainer", {"root_dir": str(tmp_path / "logs"), "compression": {"rank": 4}})
    run.update({"hessian": "kfac"}).watch(model, name_filter=["transformer.h."])
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=1,
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = AnaLogTrainer(model=model, args=args, train_dataset=data, data_collator=collate, analog=run)
    trainer.train()
    run.finalize()
    store = run.open_store()
    assert sorted(store.ids) == sorted(f"seq{i}" for i in range(8))
    rows = store.rows(0, len(store))
    assert bool(torch.isfinite(rows).all()) and rows.abs().sum(1).min() > 0
    assert run.curvature.meta["n_samples"] == 8
