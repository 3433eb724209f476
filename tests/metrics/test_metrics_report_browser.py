"""The report page in a real headless Chromium: loads offline, no script errors, draws every chart,
and checkpoint names cannot inject markup."""

import re
import shutil
import subprocess

import numpy as np
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


def _canvases(dom):
    """``(scale, ymin, ymax)`` of every chart canvas in the dumped DOM, in page order."""
    found = []
    for tag in re.findall(r"<canvas[^>]*>", dom):
        attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', tag))
        found.append(
            (attrs.get("data-scale"), float(attrs.get("data-ymin", "nan")), float(attrs.get("data-ymax", "nan")))
        )
    return found


def _scale_rows():
    """A metric spanning four decades per layer, a whole-model series, and a metric with negative values."""
    rows = []
    for step in range(0, 1000, 100):
        for i in range(9):  # more series than one colour each would need if red were allowed
            rows.append(
                {
                    "step": step,
                    "metric": "norm",
                    "component": "simple:weights",
                    "layer": f"l{i}",
                    "value": (i + 1) * 10.0 ** (step / 250),
                }
            )
        rows.append(
            {
                "step": step,
                "metric": "norm",
                "component": "whole_model",
                "layer": "whole_model.simple:weights",
                "value": 3.0 * 10.0 ** (step / 250),
            }
        )
        rows.append(
            {"step": step, "metric": "mean", "component": "simple:weights", "layer": "l0", "value": step - 500.0}
        )
    return rows


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_log_scale_toggle_whole_model_chart_and_colours_in_headless_chromium(tmp_path):
    rows = _scale_rows()
    transitions = [dict(TRANSITIONS[0], metric="norm", layer="l0", step=500, previous_step=400)]
    path = write_metrics_page(tmp_path / "report.html", rows, transitions, title="scales")
    linear = _chromium(["--dump-dom", path.as_uri()], tmp_path).stdout
    logged = _chromium(["--dump-dom", path.as_uri() + "#log"], tmp_path).stdout
    for dom in (linear, logged):
        assert re.search(r'data-charts="4" data-errors="0"', dom), dom[:1500]  # overlay, norm, norm whole, mean
    assert "norm · whole model" in linear
    top = max(r["value"] for r in rows if r["metric"] == "norm")
    charts_linear, charts_log = _canvases(linear), _canvases(logged)
    assert len(charts_linear) == len(charts_log) == 4
    norm_linear, norm_log = charts_linear[1], charts_log[1]
    assert norm_linear[0] == "linear" and norm_linear[2] == pytest.approx(top + 0.05 * (top - 1.0), rel=1e-6)
    span = np.log10(top) - np.log10(1.0)
    assert norm_log[0] == "log" and norm_log[2] == pytest.approx(np.log10(top) + 0.05 * span, rel=1e-6)
    assert norm_log[1] == pytest.approx(-0.05 * span, abs=1e-6)
    assert charts_log[3][0] == "log" and 'data-hidden="6"' in logged  # mean: values <= 0 are hidden on a log axis
    marker = re.search(r'data-transition-color="(#[0-9a-f]{6})"', linear).group(1)
    red = "rgb({}, {}, {})".format(*(int(marker[i : i + 2], 16) for i in (1, 3, 5)))
    swatches = re.findall(r'class="swatch" style="background: (rgb\([^)]*\))', linear)
    assert len(swatches) >= 9 + 1 + 1 and red not in swatches
    norm_swatches = swatches[-11:-2]  # the norm chart's nine layer series (legend order: ..., norm, whole, mean)
    assert len(set(norm_swatches)) == 9
