"""The report page in a real headless Chromium: loads offline, no script errors, draws every chart,
and checkpoint names cannot inject markup."""

import re
import shutil
import subprocess

import pytest

from analog.report.metrics_page import build_metrics_page, write_metrics_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = "</script><img src=x onerror=\"document.title='pwned'\">"


def _rows():
    rows = []
    for step in (0, 100, 250, 1000):
        for layer in ("model.0.mlp.weights", EVIL):
            rows.append(
                {"step": step, "metric": "norm", "component": "simple:weights", "layer": layer, "value": 1.0 + step}
            )
            rows.append(
                {"step": step, "metric": f"gini{EVIL}", "component": "simple:weights", "layer": layer, "value": 0.5}
            )
    rows.append({"step": 1000, "metric": "per", "component": "simple:weights", "layer": "x", "value": float("nan")})
    return rows


TRANSITIONS = [
    {
        "metric": "norm",
        "component": "simple:weights",
        "layer": EVIL,
        "step": 250,
        "previous_step": 100,
        "value": 251.0,
        "previous_value": 101.0,
        "rule": "relative",
        "score": 1.48,
    }
]


def test_page_is_self_contained_and_escapes_names():
    page = build_metrics_page(_rows(), TRANSITIONS, title=f"run {EVIL}")
    assert page.count("</script>") == 2  # only the data and the code elements close
    assert "<img" not in page
    assert not re.search(r"(src|href)=[\"']?https?:", page)


def _chromium(args, tmp_path):
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--enable-logging=stderr",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    path = write_metrics_page(tmp_path / "report.html", _rows(), TRANSITIONS, title=f"run {EVIL}")
    result = _chromium(["--dump-dom", path.as_uri()], tmp_path)
    dom = result.stdout
    status = re.search(r'id="analog-status" data-charts="(\d+)" data-errors="(\d+)"', dom)
    assert status, dom[:2000]
    assert status.groups() == ("4", "0")  # overlay + norm + gini + per
    assert "Uncaught" not in result.stderr
    assert "<img" not in dom and "<title>pwned" not in dom
    assert "&lt;/script&gt;&lt;img" in dom  # the name is shown as text
    shot = tmp_path / "shot.png"
    _chromium(["--window-size=1000,1600", f"--screenshot={shot}", path.as_uri()], tmp_path)
    assert shot.stat().st_size > 10_000
