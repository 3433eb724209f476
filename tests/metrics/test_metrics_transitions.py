"""Phase-transition rules on series with planted jumps, at real (uneven) step values."""

import numpy as np
import pytest

from analog.metrics import detect_transitions, relative_change_transitions, robust_transitions


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
