"""The Hugging Face callback with a real tiny GPT-2 and a real Trainer (no downloads)."""

import json
import subprocess
import sys

import pytest
import torch

from analog.monitor import ModelAnalysisManager, MonitorConfig

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_monitor_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from analog.monitor import *\n"
        "import analog.monitor as m\n"
        "try:\n    m.ModelAnalysisCallback\nexcept ImportError:\n    print('lazy-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy-ok"


def test_callback_with_real_trainer(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from analog.monitor import ModelAnalysisCallback

    model = _tiny_gpt2()
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 12), generator=generator)]
    probe = {"input_ids": torch.randint(0, 64, (2, 12), generator=generator)}
    analyzer = ModelAnalysisManager.create(
        MonitorConfig.comprehensive(interval=2, sparse_quality_thresholds=[0.0, 1e-4])
    )
    callback = ModelAnalysisCallback(analyzer, probe_inputs=probe)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert [step for step, _ in callback.history] == [2, 4]
    for _, metrics in callback.history:
        assert metrics["analysis/sparse/kl_at_0"] == 0.0
        assert metrics["analysis/sparse/top1_agree_at_0"] == 1.0
        assert metrics["analysis/param_change/norm_l2"] > 0.0
        assert "analysis/param_change/component/c_attn/mean_abs_delta" in metrics
        assert "analysis/param_change/layer_1/sparsity" in metrics
        # measured at the Trainer's on_optimizer_step: gradients and Adam state are there
        assert metrics["analysis/gradient/norm_l2"] > 0.0 and "analysis/gradient/layer_1/variance" in metrics
        assert metrics["analysis/momentum/adam_update_rms"] > 0.0
        assert "analysis/momentum/layer_0/exp_avg_norm" in metrics
    assert analyzer.last_errors == {}
    logged = [entry for entry in trainer.state.log_history if "analysis/param_change/norm_l2" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    from analog.runs import parse_training_log

    run = parse_training_log(tmp_path / "trainer_state.json")
    assert run.format == "trainer_state" and run.steps[:5] == [1, 2, 3, 4, 5]
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert run.loss == pytest.approx(losses) and len(losses) == 5
    assert run.extras["analysis/param_change/norm_l2"][1] == pytest.approx(logged[0]["analysis/param_change/norm_l2"])


def test_callback_sends_to_log_fn_without_trainer():
    from analog.monitor.hf import ModelAnalysisCallback

    model = _tiny_gpt2()
    sent = []
    callback = ModelAnalysisCallback(
        ModelAnalysisManager.create(MonitorConfig.minimal(interval=1)), log_fn=sent.append, prefix="a/"
    )
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    callback.on_train_begin(None, state, control, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2):
        model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
        optimizer.step()
        callback.on_optimizer_step(None, state, control, model=model, optimizer=optimizer)  # as the Trainer does
        optimizer.zero_grad()
        state.global_step = step
        callback.on_step_end(None, state, control, model=model)
    assert len(sent) == 2 and all(m["a/param_change/norm_l2"] > 0 for m in sent)
    assert state.log_history == []
