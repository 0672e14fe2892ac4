"""Statistics of raw per-step times, in one place: summaries, bootstrap confidence intervals, ratios.

Every figure derived from raw samples comes from here: the harness when it writes a record, the reader
when it turns a pytest-benchmark file into records, `loopmark compare` when it gates time. Intervals are
percentile bootstraps (`scipy.stats.bootstrap`, `method="percentile"`), seeded, so the same samples give the
same interval on every machine.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.stats import bootstrap

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
NOISY_IQR_OVER_MEDIAN = 0.1  # torch.utils.benchmark flags a measurement past this
_BATCH_VALUES = 4_000_000  # resampled values held in memory at once


def _median(*samples, axis=-1):
    return np.median(samples[0], axis=axis)


def _median_ratio(base, cand, axis=-1):
    return np.median(cand, axis=axis) / np.median(base, axis=axis)


def _interval(data: tuple, statistic, n_resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    arrays = tuple(np.asarray(d, dtype=float) for d in data)
    if all(np.all(a == a[0]) for a in arrays):  # constant samples: every resample gives the same statistic
        value = float(statistic(*arrays))
        return value, value
    batch = max(1, _BATCH_VALUES // max(sum(len(a) for a in arrays), 1))
    result = bootstrap(arrays, statistic, n_resamples=n_resamples, batch=batch, vectorized=True,
                       confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


def median_ci(samples, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
              seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median of `samples`."""
    return _interval((samples,), _median, n_resamples, confidence, seed)


def median_ratio_ci(baseline, candidate, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                    seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of median(candidate) / median(baseline), the two resampled independently."""
    return _ratio_ci(tuple(map(float, baseline)), tuple(map(float, candidate)), n_resamples, confidence, seed)


@functools.lru_cache(maxsize=4096)
def _ratio_ci(baseline: tuple, candidate: tuple, n_resamples: int, confidence: float,
              seed: int) -> tuple[float, float]:
    """Cached: the results files are rewritten after every cell, and the ratios are derived at each write."""
    return _interval((baseline, candidate), _median_ratio, n_resamples, confidence, seed)


def summarize(times_s, seed: int = SEED) -> dict:
    """The step-time fields of a record from its raw per-step times: median, IQR, the median's 95 % CI,
    IQR over median and the `noisy` flag."""
    t = np.asarray(times_s, dtype=np.float64)
    median = float(np.median(t))
    q1, q3 = np.percentile(t, [25, 75])
    iqr = float(q3 - q1)
    low, high = median_ci(t, seed=seed) if len(t) > 1 else (median, median)
    spread = iqr / median if median > 0 else math.nan
    return {"step_time_median_s": median, "step_time_iqr_s": iqr, "step_time_ci_low_s": low,
            "step_time_ci_high_s": high, "iqr_over_median": spread, "noisy": is_noisy(spread)}


def is_noisy(iqr_over_median) -> bool:
    """Whether a timing's spread is past torch.utils.benchmark's threshold."""
    return iqr_over_median is not None and math.isfinite(iqr_over_median) \
        and iqr_over_median > NOISY_IQR_OVER_MEDIAN


def ratio_with_ci(times_s, base_times_s, seed: int = SEED) -> tuple[float, float, float]:
    """median(times) / median(base) and its bootstrap 95 % CI."""
    low, high = median_ratio_ci(base_times_s, times_s, seed=seed)
    return float(np.median(times_s) / np.median(base_times_s)), low, high
