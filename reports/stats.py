"""The statistics behind reports and comparisons: bootstrap confidence intervals of medians."""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
_CHUNK_VALUES = 4_000_000  # resampled values held in memory at once


def _resampled_medians(x: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Median of each of `n_resamples` bootstrap resamples of `x` (resampled in chunks to bound memory)."""
    per_chunk = max(1, _CHUNK_VALUES // max(len(x), 1))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, per_chunk):
        stop = min(start + per_chunk, n_resamples)
        idx = rng.integers(0, len(x), size=(stop - start, len(x)))
        out[start:stop] = np.median(x[idx], axis=1)
    return out


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def median_ci(samples, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
              seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median of `samples`."""
    x = np.asarray(samples, dtype=float)
    rng = np.random.default_rng(seed)
    return _interval(_resampled_medians(x, rng, n_resamples), confidence)


def median_ratio_ci(baseline, candidate, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                    seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap CI of median(candidate) / median(baseline), both resampled independently."""
    base = np.asarray(baseline, dtype=float)
    cand = np.asarray(candidate, dtype=float)
    rng = np.random.default_rng(seed)
    base_medians = _resampled_medians(base, rng, n_resamples)
    cand_medians = _resampled_medians(cand, rng, n_resamples)
    return _interval(cand_medians / base_medians, confidence)
