"""Seed 003 parity: custom parsers stay aligned, resumes keep the last record, Config/Mode lines,
mean gradient norm and key findings, --smooth N, the seed's plot signature, linear-time parsing."""

import math
import re
import statistics
import subprocess
import sys
import time

import pytest

from analog.cli import main
from analog.runs import LogParseError, LogParser, RunComparator, moving_average, parse_training_log
from analog.runs.plots import plot_loss_comparison

SEED_TRAIN = (
    "[Epoch 1/3] Step 100 | Tokens: 1.6M | LM Loss: 10.4500 | Polar: 2.7497 | PPL: 34546.05 | "
    "LR: 8.19e-08 | GradNorm: 5.96 | Gate std: 0.0838 | Tok/s: 20555"
)
SEED_VAL = "[Validation] Loss: 3.3593, PPL: 28.77, Train/Val Gap: 0.83x"
NAN = float("nan")


class SeedStyleParser(LogParser):
    """The seed README's custom parser, verbatim in behaviour: appends to steps and loss only."""

    MY_PATTERN = re.compile(r"step=(\d+) loss=([\d.]+)")

    def _parse_line(self, line):
        match = self.MY_PATTERN.search(line)
        if match:
            self.metrics.steps.append(int(match.group(1)))
            self.metrics.loss.append(float(match.group(2)))
            return
        super()._parse_line(line)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _same(a, b):
    return len(a) == len(b) and all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def test_seed_custom_parser_mixed_with_default_lines_keeps_values_on_their_steps(tmp_path):
    lines = ["step=10 loss=2.5", SEED_TRAIN, "step=200 loss=1.5", SEED_VAL, "step=300 loss=1.25"]
    metrics = parse_training_log(_write(tmp_path, "mixed.log", lines), parser_cls=SeedStyleParser)
    # reference: what each line says, step by step
    expected = {
        10: {"loss": 2.5},
        100: {"loss": 10.45, "ppl": 34546.05, "lr": 8.19e-08, "grad_norm": 5.96, "tok_per_sec": 20555.0},
        200: {"loss": 1.5},
        300: {"loss": 1.25},
    }
    assert metrics.steps == sorted(expected)
    compared = 0
    for name in ("loss", "ppl", "lr", "grad_norm", "tok_per_sec"):
        assert _same(getattr(metrics, name), [expected[s].get(name, NAN) for s in metrics.steps]), name
        compared += 1
    assert _same(metrics.extras["polar"], [NAN, 2.7497, NAN, NAN])
    assert metrics.val_steps == [200] and metrics.val_loss == [3.3593]  # after step=200's line
    assert compared == 5


def test_value_on_its_own_line_belongs_to_the_current_step_and_errors_name_the_line(tmp_path):
    class GradLines(SeedStyleParser):
        def _parse_line(self, line):
            if line.startswith("grad="):
                self.metrics.grad_norm.append(float(line[5:]))
                return
            if line.startswith("twice"):
                self.metrics.steps.append(7)
                self.metrics.loss += [1.0, 2.0]
                return
            super()._parse_line(line)

    metrics = parse_training_log(
        _write(tmp_path, "g.log", ["step=1 loss=3.0", "grad=0.5", "step=2 loss=2.0", "grad=0.25", "grad=0.125"]),
        parser_cls=GradLines,
    )
    assert metrics.steps == [1, 2] and metrics.grad_norm == [0.5, 0.125]  # a repeated value keeps the last
    with pytest.raises(LogParseError, match=r"line 2: 2 values of loss for 1 new step"):
        parse_training_log(_write(tmp_path, "bad.log", ["step=1 loss=3.0", "twice"]), parser_cls=GradLines)


def _step_line(step, loss, epoch=1):
    return f"[Epoch {epoch}/3] Step {step} | LM Loss: {loss:.4f} | GradNorm: 1.0"


def test_steps_repeated_after_a_resume_keep_the_last_record(tmp_path):
    first = [(100, 5.0), (200, 4.0), (300, 3.5)]
    resumed = [(200, 4.1), (300, 3.4), (400, 3.0)]
    lines = [_step_line(s, v) for s, v in first[:2]] + ["[Validation] Loss: 4.5, PPL: 90.0"]
    lines += [_step_line(*first[2]), "Resuming from checkpoint"] + [_step_line(s, v) for s, v in resumed]
    lines += ["[Validation] Loss: 3.2, PPL: 24.5"]
    metrics = parse_training_log(_write(tmp_path, "resumed.log", lines))
    reference = dict(first + resumed)  # a dict keeps the last value given for a key
    assert metrics.steps == sorted(reference)
    assert metrics.loss == [reference[s] for s in sorted(reference)]
    assert metrics.val_steps == [400] and metrics.val_loss == [3.2]  # validation at 200 was on the abandoned branch
    assert metrics.resumed_records == 3 and metrics.summary()["resumed_records"] == 3

    # a restart further back abandons the steps the first attempt reached beyond it
    lines = [_step_line(s, v) for s, v in [(100, 5.0), (200, 4.0), (300, 3.5), (400, 3.1), (200, 4.2), (300, 3.6)]]
    metrics = parse_training_log(_write(tmp_path, "back.log", lines))
    assert metrics.steps == [100, 200, 300] and metrics.loss == [5.0, 4.2, 3.6]

    # a step counter that restarts every epoch is not a resume
    lines = [_step_line(s, 1.0 / (e * s), epoch=e) for e in (1, 2) for s in (1, 2, 3)]
    metrics = parse_training_log(_write(tmp_path, "epochs.log", lines))
    assert metrics.steps == [1, 2, 3, 1, 2, 3] and metrics.resumed_records == 0


def test_resume_in_json_lines(tmp_path):
    records = ['{"step": 1, "loss": 3.0}', '{"step": 2, "loss": 2.0}', '{"step": 2, "loss": 2.5}']
    records += ['{"step": 3, "loss": 1.5, "eval_loss": 1.75}']
    metrics = parse_training_log(_write(tmp_path, "m.jsonl", records))
    assert metrics.steps == [1, 2, 3] and metrics.loss == [3.0, 2.5, 1.5]
    assert metrics.val_steps == [3] and metrics.val_loss == [1.75]


def test_config_and_mode_lines_as_the_seed_reads_them(tmp_path, capsys):
    lines = ["Config: dim=512, layers=6, heads=8", "Mode: ATTENTION-ONLY (ablation)", SEED_TRAIN]
    metrics = parse_training_log(_write(tmp_path, "c.log", lines))
    assert metrics.config == {"dim": 512, "layers": 6, "heads": 8, "mode": "ATTENTION-ONLY (ablation)"}
    assert metrics.steps == [100]
    other = parse_training_log(_write(tmp_path, "d.log", ["Config: lr=1e-3, optimizer=adamw", SEED_TRAIN]))
    assert other.config == {"lr": 0.001, "optimizer": "adamw"}
    capsys.readouterr()
    assert main(["runs", "summary", str(tmp_path / "c.log")]) == 0
    out = capsys.readouterr().out
    assert "config.dim         512" in out and "config.mode        ATTENTION-ONLY (ablation)" in out


def _run_lines(run, mode, dim, losses, tok, grad, val_ppl):
    lines = [f"Config: dim={dim}, layers=6, heads=8", f"Mode: {mode}"]
    for i, (loss, t, g) in enumerate(zip(losses, tok, grad), start=1):
        lines.append(f"Step {i * 10} | LM Loss: {loss} | PPL: {math.exp(loss):.3f} | GradNorm: {g} | Tok/s: {t}")
    lines.append(f"[Validation] Loss: {math.log(val_ppl):.4f}, PPL: {val_ppl}")
    return lines


def test_comparison_table_has_config_mode_mean_grad_norm_and_key_findings(tmp_path, capsys):
    a = dict(losses=[4.0, 3.0, 2.5], tok=[1000, 1200, 1100], grad=[2.0, 1.0, 0.5], val_ppl=20.0)
    b = dict(losses=[4.0, 3.5], tok=[400, 500], grad=[3.0, 2.5], val_ppl=30.0)
    comparator = RunComparator()
    comparator.add_run("TTL", _write(tmp_path, "a.log", _run_lines("TTL", "MEMORY+ATTENTION", 512, **a)))
    comparator.add_run("Abl", _write(tmp_path, "b.log", _run_lines("Abl", "ATTENTION-ONLY", 256, **b)))
    table = comparator.format_table()
    rows = {row["name"]: row for row in comparator.rows()}
    assert rows["TTL"]["mean_grad_norm"] == pytest.approx(statistics.fmean(a["grad"]))
    assert rows["Abl"]["mean_grad_norm"] == pytest.approx(statistics.fmean(b["grad"]))
    assert rows["TTL"]["config"] == "512/6/8" and rows["Abl"]["mode"] == "ATTENTION-ONLY"
    assert "Grad norm" in table and "1.17" in table and "2.75" in table and "MEMORY+ATTENTION" in table
    # the seed's findings: lowest best-val PPL; fastest/slowest mean tokens/s
    ratio = statistics.fmean(a["tok"]) / statistics.fmean(b["tok"])
    findings = table.split("KEY FINDINGS:")[1]
    assert "Best val PPL: TTL (20.00)" in findings
    assert f"Throughput: TTL is {ratio:.2f}x faster than Abl" in findings
    assert "Lowest loss at the common point: TTL (3.0000)" in findings
    single = RunComparator().add_run("TTL", tmp_path / "a.log")
    assert "KEY FINDINGS" not in single.format_table()


def test_key_findings_say_equal_throughput_instead_of_a_run_faster_than_itself(tmp_path):
    comparator = RunComparator()
    for name in ("A", "B"):
        comparator.add_run(name, _write(tmp_path, f"{name}.log", _run_lines(
            name, "M", 64, losses=[4.0, 3.0], tok=[1000, 1000], grad=[1.0, 1.0], val_ppl=20.0)))
    findings = comparator.format_table().split("KEY FINDINGS:")[1]
    assert "Throughput: equal across runs (1000 tok/s)" in findings
    assert "faster than" not in findings


def test_moving_average_is_the_seeds_trailing_window():
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    window = 3
    reference = [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]
    assert moving_average(values, window) == pytest.approx(reference) and len(reference) == 3
    assert moving_average(values, 1) == values and moving_average(values[:2], 3) == values[:2]
    with pytest.raises(ValueError, match="smooth_window"):
        moving_average(values, 0)


def test_smooth_cli_and_seed_plot_signature(tmp_path, capsys):
    log = _write(tmp_path, "a.log", _run_lines("a", "M", 64, [4.0, 3.0, 2.5, 2.0], [1, 2, 3, 4], [1, 1, 1, 1], 9.0))
    figure = plot_loss_comparison(
        {"a": parse_training_log(log)}, title="My title", output_path=tmp_path / "p" / "loss.png", smooth_window=2
    )
    ax = figure.axes[0]
    assert ax.get_title() == "My title" and (tmp_path / "p" / "loss.png").is_file()
    smoothed = [line for line in ax.get_lines() if line.get_label() == "a (train)"][0]
    assert list(smoothed.get_xdata()) == [20.0, 30.0, 40.0]
    assert list(smoothed.get_ydata()) == pytest.approx([3.5, 2.75, 2.25])
    assert main(["runs", "report", str(log), "-o", str(tmp_path / "out"), "--smooth", "2"]) == 0
    assert '"smooth_window": 2' in (tmp_path / "out" / "comparison_data.json").read_text()
    assert main(["runs", "report", str(log), "-o", str(tmp_path / "o2"), "--smooth", "0"]) == 1
    assert "smooth_window must be an integer >= 1" in capsys.readouterr().err


def test_setup_makes_matplotlib_an_extra_and_drops_einops():
    import ast
    from pathlib import Path

    setup = Path(__file__).resolve().parents[2] / "setup.py"
    call = next(n for n in ast.walk(ast.parse(setup.read_text())) if isinstance(n, ast.Call) and n.keywords)
    wanted = ("install_requires", "extras_require")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    assert not {"matplotlib", "einops"} & set(kwargs["install_requires"])
    assert kwargs["extras_require"]["plot"] == ["matplotlib"] and "matplotlib" in kwargs["extras_require"]["test"]


def test_every_package_imports_without_matplotlib_and_plots_say_what_is_missing(tmp_path):
    log = _write(tmp_path, "a.log", [SEED_TRAIN])
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['einops'] = None\n"
        "import importlib, pkgutil, analog\n"
        "names = [m.name for m in pkgutil.walk_packages(analog.__path__, 'analog.') if m.ispkg]\n"
        "for name in names: importlib.import_module(name)\n"
        "assert len(names) >= 9, names\n"
        "from analog.runs import parse_training_log, plot_loss_comparison\n"
        f"m = parse_training_log({str(log)!r}); assert m.steps == [100]\n"
        "try:\n    plot_loss_comparison({'a': m})\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'ERR analog.runs plots need matplotlib, which is not installed: pip install "analog-ml[plot]"' in out


ADVERSARIAL = [
    "Step 1 | a{s}b: 1",
    "[Validation] a{s}b",
    "Step 1 | LM Loss:{s}x",
    "[Epoch 1/3]{s}x",
    "Step{s}x",
    "Config: a{s}=1",
    "x{s}Mode: y{s}z",
    "Step 1 | {s}|{s}|",
]


def _cpu_seconds(spaces):
    lines = [pattern.format(s=" " * spaces) for pattern in ADVERSARIAL]
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        LogParser().parse_lines(lines)
        best = min(best, time.process_time() - start)
        if best > 1.0:  # clearly not linear: do not repeat
            break
    return best


def test_parsing_is_linear_in_the_line_length():
    """Size scaling, not a time limit: 8x the spaces must cost well under 64x (quadratic) the CPU.
    Before the fix, 16k spaces took seconds and the ratio was ~60; linear code gives ~8 or less."""
    small, large = _cpu_seconds(4000), _cpu_seconds(32000)
    assert large / max(small, 1e-4) < 24, (small, large)
    metrics = LogParser().parse_lines(["Step 5 | LM Loss:" + " " * 100_000 + "2.5"])
    assert metrics.steps == [5] and metrics.loss == [2.5]
