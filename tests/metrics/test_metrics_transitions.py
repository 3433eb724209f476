"""Phase-transition rules on series with planted jumps, at real (uneven) step values."""

import numpy as np
import pytest

from analog.metrics import (
    changepoint_transitions,
    detect_transitions,
    relative_change_transitions,
    robust_transitions,
)


def test_relative_rule_flags_planted_jump_at_its_step():
    steps = [0, 10, 20, 50, 100, 250, 400]
    values = [1.0, 1.05, 1.1, 1.12, 2.0, 2.05, 2.1]
    hits = relative_change_transitions(steps, values)
    assert [(h.step, h.previous_step) for h in hits] == [(100, 50)]
    assert hits[0].score == pytest.approx(0.88 / 1.12)
    assert relative_change_transitions(steps, values, threshold=0.9) == []


def test_robust_rule_finds_jump_in_noise_where_relative_rule_over_flags():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 4000, 100)
    values = 0.05 * rng.standard_normal(steps.size)  # noise around zero: relative change is huge
    values[25:] += 3.0
    robust = robust_transitions(steps, values)
    relative = relative_change_transitions(steps, values)
    assert 2500 in [h.step for h in robust]
    assert len(robust) <= 3 < 10 < len(relative)
    assert [h.step for h in robust_transitions(steps, values, z_threshold=5.0)] == [2500]


def test_robust_rule_uses_real_step_spacing():
    steps = [0, 100, 200, 300, 400, 500, 1500, 1600, 1700]
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 15.0, 16.0, 17.0]  # constant rate: no transition
    assert robust_transitions(steps, values) == []
    assert [h.step for h in relative_change_transitions(steps, values)] == [100, 200, 300, 400, 500, 1500]


def test_robust_rule_with_zero_mad_and_short_series():
    steps = list(range(10))
    values = [float(s) for s in steps]
    values[6:] = [v + 10 for v in values[6:]]
    assert [h.step for h in robust_transitions(steps, values)] == [6]
    assert robust_transitions(steps[:4], values[:4]) == []


def test_detect_transitions_labels_each_series_and_skips_nan():
    series = [
        (("norm", "simple:weights", "a"), [0, 1, 2, 3, 4, 5], [1, 1, 1, float("nan"), 5, 5]),
        (("norm", "simple:weights", "b"), [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1]),
    ]
    found = detect_transitions(series, rules=("relative",))
    assert len(found) == 1
    assert found[0]["layer"] == "a" and found[0]["step"] == 4 and found[0]["previous_step"] == 2


def _families(t):
    return [np.sqrt(t), np.log1p(50 * t) / 4, np.exp(-t / 0.25), np.exp(-t / 0.08), t, 0 * t, 2 - t**2]


def test_changepoint_default_on_a_20_checkpoint_run_flags_planted_jumps_and_is_quiet_elsewhere():
    """60 series x 20 checkpoints: smooth curves of every common shape (scale about 1) with noise of sd
    0.01-0.05, a planted jump of 0.25-0.5 in every third series."""
    rng = np.random.default_rng(7)
    steps = np.arange(20) * 250
    t = np.linspace(0, 1, 20)
    series, planted = [], {}
    for i in range(60):
        base = _families(t)[i % 7]
        sd = [0.01, 0.03, 0.05][i % 3]
        values = base + sd * rng.standard_normal(20)
        if i % 3 == 0:
            at = int(rng.integers(3, 18))
            values[at:] += rng.choice([-1, 1]) * rng.uniform(0.25, 0.5)  # 5 to 50 noise units
            planted[f"layer{i}"] = int(steps[at])
        series.append((("m", "simple:weights", f"layer{i}"), steps, values))
    found = detect_transitions(series)  # default rules
    assert {t["rule"] for t in found} == {"changepoint"}
    hits = {(t["layer"], t["step"]) for t in found}
    assert len(planted) == 20
    missed = [(layer, step) for layer, step in planted.items() if (layer, step) not in hits]
    assert not missed, (missed, sorted(hits))
    false_positives = [h for h in hits if planted.get(h[0]) != h[1]]
    assert len(false_positives) <= 3, false_positives  # of 1200 checkpoints; 0.05 per series in benchmarks
    relative = detect_transitions(series, rules=("relative",))
    assert len(relative) > 100  # Phase-Viz's 20% rule on the same run


def test_changepoint_is_silent_on_constant_rate_at_uneven_steps_and_on_smooth_bends():
    steps = [0, 100, 200, 300, 400, 500, 1500, 1600, 1700, 3000]
    assert changepoint_transitions(steps, [0.5 * s for s in steps]) == []
    t = np.linspace(0, 1, 40)
    for values in _families(t):
        assert changepoint_transitions(np.arange(40), values) == []


def test_changepoint_merges_a_transition_spread_over_two_checkpoints_and_scores_it():
    t = np.linspace(0, 1, 20)
    values = 1 / (1 + np.exp(-(t - 0.52) / 0.02))  # rises over checkpoints 9..11 (0.09, 0.58, 0.95)
    (hit,) = changepoint_transitions(np.arange(20) * 10, values)
    assert (hit.previous_step, hit.step) == (80, 110) and hit.rule == "changepoint"
    exact = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    (jump,) = changepoint_transitions(range(10), exact)
    assert (jump.previous_step, jump.step, jump.previous_value, jump.value) == (4, 5, 0.0, 1.0)
    assert jump.score == pytest.approx(1.0 / 0.02)  # jump / noise floor (2% of the range)


def test_changepoint_needs_five_checkpoints_and_a_jump_of_min_jump():
    assert changepoint_transitions([0, 1, 2, 3], [0, 0, 5, 5]) == []
    values = [0.0] * 10 + [0.05] * 10  # a clean jump of the whole range
    assert [h.step for h in changepoint_transitions(range(20), values)] == [10]
    ramp = np.linspace(0, 1, 20)
    ramp[10:] += 0.1  # jump 0.1 on a range of 1.1: 9% of the range
    assert changepoint_transitions(range(20), ramp) == []  # min_jump 0.1 of the range by default
    assert [h.step for h in changepoint_transitions(range(20), ramp, min_jump=0.05)] == [10]
