"""The harness's statistics against numbers computed by hand."""

import pytest

from reports import stats


def test_median_iqr_and_noise_flag_by_hand():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["step_time_median_s"] == 3.0
    assert s["step_time_iqr_s"] == 2.0  # numpy's linear percentiles: q1 = 2, q3 = 4
    assert s["noisy"] is True  # IQR / median = 0.67 > 0.1
    assert s["step_time_ci_low_s"] <= 3.0 <= s["step_time_ci_high_s"]


def test_constant_samples_have_an_exact_ci_and_ratio():
    ratio, low, high = stats.ratio_with_ci([2.0] * 50, [1.0] * 50)
    assert (ratio, low, high) == (2.0, 2.0, 2.0)
    assert stats.summarize([0.5] * 10)["noisy"] is False


def test_ratio_ci_brackets_a_clear_difference():
    base = [1.0 + 0.01 * (i % 7) for i in range(200)]
    slow = [1.2 * t for t in base]
    ratio, low, high = stats.ratio_with_ci(slow, base)
    assert ratio == pytest.approx(1.2) and low <= 1.2 <= high and high - low < 0.05
