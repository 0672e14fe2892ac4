"""Statistics of raw per-step times: median, IQR, bootstrap confidence intervals, ratios.

The bootstrap itself lives in `reports.stats`, shared with the reports and `loopmark compare`.
"""

from __future__ import annotations

import numpy as np

from reports.stats import median_ci, median_ratio_ci

NOISY_IQR_OVER_MEDIAN = 0.1  # torch.utils.benchmark flags a measurement past this


def summarize(times_s: list[float], seed: int = 0) -> dict:
    t = np.asarray(times_s, dtype=np.float64)
    median = float(np.median(t))
    q1, q3 = np.percentile(t, [25, 75])
    low, high = median_ci(t, seed=seed)
    iqr = float(q3 - q1)
    return {"step_time_median_s": median, "step_time_iqr_s": iqr, "step_time_ci_low_s": low,
            "step_time_ci_high_s": high, "iqr_over_median": iqr / median if median else float("nan"),
            "noisy": bool(median and iqr / median > NOISY_IQR_OVER_MEDIAN)}


def ratio_with_ci(times_s: list[float], base_times_s: list[float], seed: int = 0) -> tuple[float, float, float]:
    """median(times) / median(base) and its bootstrap 95 % CI, both sets resampled independently."""
    low, high = median_ratio_ci(base_times_s, times_s, seed=seed)
    return float(np.median(times_s) / np.median(base_times_s)), low, high
