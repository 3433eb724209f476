"""compare_runs / RunComparator / the `analog runs` command: files, JSON contents and PNG sizes."""

import json
import math
import struct
import subprocess
import sys

import pytest

from analog.cli import main
from analog.runs import RunComparator, compare_runs, parse_training_log, smooth

EXPECTED_FILES = {
    "loss_comparison.png": (1000, 600),
    "ppl_comparison.png": (1000, 600),
    "throughput_comparison.png": (1000, 600),
}


def _log(path, losses, tokens_per_step=1.6e6, malformed=False, val_every=2):
    lines = ["Starting run"]
    for i, loss in enumerate(losses, start=1):
        step = 100 * i
        lines.append(
            f"[Epoch 1/3] Step {step} | Tokens: {tokens_per_step * i / 1e6:.1f}M | LM Loss: {loss:.4f} | "
            f"PPL: {math.exp(loss):.2f} | LR: {1e-4 * i:.2e} | GradNorm: {1.0 / i:.2f} | Tok/s: {20000 + i}"
        )
        if i % val_every == 0:
            lines.append(f"[Validation] Loss: {loss + 0.1:.4f}, PPL: {math.exp(loss + 0.1):.2f}, Train/Val Gap: 0.9x")
    if malformed:
        lines.append("[Epoch 1/3] Step 999 | LM Loss: ??")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def two_logs(tmp_path):
    (tmp_path / "ttl").mkdir()
    a = _log(tmp_path / "ttl" / "train.log", [5.0, 4.0, 3.5, 3.2])
    b = _log(tmp_path / "abl.log", [5.0, 4.5, 4.2], tokens_per_step=0.8e6, malformed=True)
    return a, b


def test_compare_runs_writes_every_file(tmp_path, two_logs, capsys):
    out = tmp_path / "out"
    comparator = compare_runs({"TTL": two_logs[0], "Ablation": two_logs[1]}, output_dir=out, smoothing=0.5)
    assert "TTL" in capsys.readouterr().out
    expected = dict(EXPECTED_FILES, **{"curves_TTL.png": (1500, 900), "curves_Ablation.png": (1500, 900)})
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(list(expected) + ["comparison_report.txt", "comparison_data.json"])
    for name, size in expected.items():
        assert png_size(out / name) == size, name
    assert len(expected) == 5
    report = (out / "comparison_report.txt").read_text()
    assert "Ablation" in report and "1 malformed" in report and "Step 999" in report
    assert comparator.common_x() == 300.0


def test_json_matches_parsed_values(tmp_path, two_logs):
    out = tmp_path / "out"
    compare_runs({"TTL": two_logs[0], "Ablation": two_logs[1]}, output_dir=out, print_table=False)
    data = json.loads((out / "comparison_data.json").read_text())
    assert data["align"] == "step" and data["common_x"] == 300
    assert sorted(data["runs"]) == ["Ablation", "TTL"]
    checked = 0
    for name, path in (("TTL", two_logs[0]), ("Ablation", two_logs[1])):
        parsed = parse_training_log(path)
        run = data["runs"][name]
        for key in ("steps", "tokens", "loss", "ppl", "lr", "grad_norm", "tok_per_sec"):
            assert run["series"][key] == getattr(parsed, key), (name, key)
            checked += 1
        assert run["validation"]["loss"] == parsed.val_loss and run["validation"]["steps"] == parsed.val_steps
        assert run["summary"]["final_loss"] == parsed.loss[-1]
        assert run["malformed_lines"] == parsed.malformed_lines
    assert checked == 14
    assert data["runs"]["TTL"]["loss_at_common"] == 3.5 and data["runs"]["Ablation"]["loss_at_common"] == 4.2
    assert data["runs"]["Ablation"]["malformed_lines"] == 1


def test_alignment_by_tokens_and_smoothing(tmp_path, two_logs):
    comparator = RunComparator(align="tokens").add_run("a", two_logs[0]).add_run("b", two_logs[1])
    assert comparator.common_x() == pytest.approx(2.4e6)
    assert comparator.loss_at("a", 2.4e6) == 5.0 and comparator.loss_at("b", 2.4e6) == 4.2
    trainer_state = tmp_path / "trainer_state.json"
    trainer_state.write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    comparator.add_run("hf", trainer_state)
    with pytest.raises(ValueError, match="without token counts.*hf"):
        comparator.rows()
    assert smooth([1.0, 3.0, float("nan"), 3.0], 0.5)[:2] == [1.0, pytest.approx((0.25 + 1.5) / 0.75)]
    assert math.isnan(smooth([1.0, float("nan")], 0.5)[1])
    with pytest.raises(ValueError):
        RunComparator(smoothing=1.0)


def test_cli_compare_report_summary(tmp_path, two_logs, capsys):
    out = tmp_path / "cmp"
    assert main(["runs", "compare", str(two_logs[0]), str(two_logs[1]), "-o", str(out)]) == 0
    assert png_size(out / "curves_ttl.png") == (1500, 900) and png_size(out / "curves_abl.png") == (1500, 900)
    assert main(["runs", "report", str(two_logs[1]), "-o", str(tmp_path / "rep"), "--align", "tokens"]) == 0
    assert json.loads((tmp_path / "rep" / "comparison_data.json").read_text())["align"] == "tokens"
    capsys.readouterr()
    assert main(["runs", "summary", str(two_logs[0])]) == 0
    assert "final_loss         3.2" in capsys.readouterr().out
    empty = tmp_path / "empty.log"
    empty.write_text("")
    assert main(["runs", "compare", str(two_logs[0]), str(empty), "-o", str(tmp_path / "x")]) == 1
    assert f"training log {empty} is empty" in capsys.readouterr().err


def _hide_matplotlib(monkeypatch):
    """As on an install without the [plot] extra: every matplotlib import raises ImportError."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("command", ["compare", "report"])
def test_cli_without_matplotlib_fails_before_any_work_or_folder(tmp_path, two_logs, capsys, monkeypatch, command):
    _hide_matplotlib(monkeypatch)
    out = tmp_path / "comparison"
    logs = [str(p) for p in two_logs] if command == "compare" else [str(two_logs[0])]
    assert main(["runs", command, *logs, "-o", str(out), "--smooth", "10"]) == 1
    captured = capsys.readouterr()
    assert 'need matplotlib, which is not installed: pip install "analog-ml[plot]"' in captured.err
    assert captured.out == "" and not out.exists()  # no table printed, no empty folder left


def test_generate_comparison_without_matplotlib_makes_no_folder(tmp_path, two_logs, monkeypatch):
    comparator = RunComparator()
    comparator.add_run(None, str(two_logs[0]))
    _hide_matplotlib(monkeypatch)
    with pytest.raises(ImportError, match=r"analog-ml\[plot\]"):
        comparator.generate_comparison(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point(two_logs):
    out = subprocess.run(
        [sys.executable, "-m", "analog", "runs", "summary", str(two_logs[1])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "malformed_lines    1" in out.stdout and "Step 999" in out.stdout
