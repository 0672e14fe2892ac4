"""Statistics of raw per-step times: median, IQR, bootstrap confidence intervals, ratios."""

from __future__ import annotations

import numpy as np

NOISY_IQR_OVER_MEDIAN = 0.1  # torch.utils.benchmark flags a measurement past this
BOOTSTRAP_RESAMPLES = 2000


def summarize(times_s: list[float], seed: int = 0) -> dict:
    t = np.asarray(times_s, dtype=np.float64)
    median = float(np.median(t))
    q1, q3 = np.percentile(t, [25, 75])
    low, high = bootstrap_median_ci(t, seed)
    iqr = float(q3 - q1)
    return {"step_time_median_s": median, "step_time_iqr_s": iqr, "step_time_ci_low_s": low,
            "step_time_ci_high_s": high, "iqr_over_median": iqr / median if median else float("nan"),
            "noisy": bool(median and iqr / median > NOISY_IQR_OVER_MEDIAN)}


def bootstrap_median_ci(t: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(t, size=(BOOTSTRAP_RESAMPLES, len(t)), replace=True), axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(medians, [alpha, 1 - alpha])
    return float(low), float(high)


def ratio_with_ci(times_s: list[float], base_times_s: list[float], seed: int = 0,
                  level: float = 0.95) -> tuple[float, float, float]:
    """median(times) / median(base) and a bootstrap CI, resampling both sets independently."""
    a = np.asarray(times_s, dtype=np.float64)
    b = np.asarray(base_times_s, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ra = np.median(rng.choice(a, size=(BOOTSTRAP_RESAMPLES, len(a)), replace=True), axis=1)
    rb = np.median(rng.choice(b, size=(BOOTSTRAP_RESAMPLES, len(b)), replace=True), axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(ra / rb, [alpha, 1 - alpha])
    return float(np.median(a) / np.median(b)), float(low), float(high)
