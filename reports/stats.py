"""Statistics of raw samples, in one place: summaries, confidence intervals, ratios, memory growth, interference.

Every figure derived from raw samples comes from here: the harness when it writes a record, the reader
when it turns a pytest-benchmark file into records, `loopmark compare` when it gates time. Intervals of
medians of many samples are percentile bootstraps (`scipy.stats.bootstrap`, `method="percentile"`), seeded, so
the same samples give the same interval on every machine; the interval of a ratio over a run's few timed blocks is
Student's t on their logarithms (`block_ratio_with_ci`), that of a memory growth slope the least-squares one
(`growth_interval`). Whether a timed block was disturbed is judged here too (`block_interference`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

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
    from scipy.stats import bootstrap  # on first use: scipy.stats costs a second of every command's start

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


# -- time relative to a reference, block by block -------------------------------------------------------

def block_ratios(block_medians_s, reference_block_medians_s) -> np.ndarray | None:
    """One sample per timed block: the block's median step time over the median of the reference's block timed in
    the same round (None when the blocks do not pair up: missing, of other counts, or not positive).

    The one estimator of a time ratio, shared by the report (`reports.results.derive`: a variant against its
    baseline within a run) and `loopmark compare` (each run's blocks against that run's baseline, before the two
    runs are compared). Variants are timed interleaved with their baseline, round by round, so whatever slows the
    whole machine for a round divides out; single steps are not independent draws (the steps of one block share
    the machine's state), blocks are taken to be."""
    if not isinstance(block_medians_s, (list, tuple, np.ndarray)) \
            or not isinstance(reference_block_medians_s, (list, tuple, np.ndarray)):
        return None
    try:
        blocks = np.asarray(block_medians_s, dtype=float)
        reference = np.asarray(reference_block_medians_s, dtype=float)
    except (TypeError, ValueError):
        return None
    if blocks.ndim != 1 or blocks.shape != reference.shape or len(blocks) == 0:
        return None
    if not (np.all(np.isfinite(blocks)) and np.all(np.isfinite(reference)) and np.all(reference > 0)):
        return None
    return blocks / reference


def block_ratio_with_ci(block_medians_s, reference_block_medians_s,
                        confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None] | None:
    """(median of the block ratios, a 95 % interval) of `block_ratios`; the interval is None with a single block,
    the whole result None when the blocks do not pair up.

    The interval is Student's t on the logarithms of the block ratios (n - 1 degrees of freedom), widened where
    needed to hold the median. Runs have 3 to 5 blocks; over so few, a percentile bootstrap of the median spans only
    their range: between runs of the same cells on a shared 2-core VM it held the other run's ratio 54 % of the time,
    this interval 91 % (`python -m bench.load_coverage` measures it on the machine it runs on)."""
    ratios = block_ratios(block_medians_s, reference_block_medians_s)
    if ratios is None:
        return None
    ratio = float(np.median(ratios))
    if len(ratios) < 2:
        return ratio, None, None
    logs = np.log(ratios)
    if np.all(logs == logs[0]):
        return ratio, ratio, ratio
    from scipy.stats import t as student_t

    quantile = float(student_t.ppf(0.5 + confidence / 2, len(logs) - 1))
    half = quantile * float(np.std(logs, ddof=1)) / math.sqrt(len(logs))
    centre = float(np.mean(logs))
    return ratio, min(math.exp(centre - half), ratio), max(math.exp(centre + half), ratio)


# -- memory growth ----------------------------------------------------------------------------------------

LEAK_BYTES_PER_STEP = 1024  # growth above this, and significant, is called a leak (1 KiB/step)
GROWS_BYTES_PER_STEP = 64  # significant growth at most this is called none: less than a small tensor a step
GROWTH_T_CONFIDENCE = 0.95  # two-sided: a slope is significant when its 95 % interval excludes 0


def growth_per_step(trace) -> tuple[float, float, int]:
    """(least-squares slope per step, its standard error, points used) of a memory trace sampled at step
    boundaries, from the end of the first step on (before it the loop's locals do not exist yet, which would read
    as one step of growth); NaN for both with fewer than 3 points (the error needs n - 2 >= 1 degrees of freedom).

    Computed on centred values: a constant trace gives exactly 0 (no -1.9e-11 from a solver's rounding). The
    standard error is the ordinary least-squares one, which takes the residuals as independent: a trace that
    moves in steps (an allocator taking a new arena) makes it optimistic, so a leak is also held to a threshold."""
    values = [v for v in (list(trace)[1:] if isinstance(trace, (list, tuple, np.ndarray)) else [])
              if v is not None and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)]
    n = len(values)
    if n < 3:
        return math.nan, math.nan, n
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(n, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float(np.dot(xc, xc))
    slope = float(np.dot(xc, yc)) / sxx
    residuals = yc - slope * xc
    se = math.sqrt(float(np.dot(residuals, residuals)) / (n - 2) / sxx)
    return slope, se, n


def growth_interval(slope: float, se: float, n: int | None = None) -> tuple[float, float]:
    """The two-sided 95 % interval of a growth slope: Student's t with n - 2 degrees of freedom for a fit to `n`
    points, the normal quantile when `n` is unknown."""
    if not (_real(slope) and _real(se)) or (n is not None and n < 3):
        return math.nan, math.nan
    from scipy.stats import norm
    from scipy.stats import t as student_t

    q = 0.5 + GROWTH_T_CONFIDENCE / 2
    half = float(student_t.ppf(q, n - 2) if n is not None else norm.ppf(q)) * se
    return slope - half, slope + half


def growth_class(slope, se, n, threshold: float = LEAK_BYTES_PER_STEP) -> str | None:
    """What a growth slope means: "leak" (its 95 % interval lies above 0 and the slope is above `threshold`),
    "grows" (significant, above `GROWS_BYTES_PER_STEP` and at most `threshold`: memory held until the epoch
    ends, say), "none" (its interval includes 0, it falls, or it grows by a few bytes a step), None when unknown."""
    if not _real(slope):
        return None
    if not _real(se) or (n is not None and n < 3):
        return "leak" if slope > threshold else None  # no error estimate: the threshold alone
    low, _ = growth_interval(slope, se, None if n is None else int(n))
    if low <= 0 or slope <= GROWS_BYTES_PER_STEP:
        return "none"
    return "leak" if slope > threshold else "grows"


def _real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


# -- interference during a timed block --------------------------------------------------------------------

MAX_WAIT_FRACTION = 0.10  # the process's threads runnable but waiting for a CPU, over the block's wall time
MIN_MAIN_CPU_OVER_WALL = 0.85  # without wait readings: a CPU block's main thread runs all the time


def block_interference(load, device: str | None) -> list[str]:
    """What disturbed one timed block, from what was read around it outside its timed region
    (`bench.timing.LoadWatch`); an empty list when nothing did.

    - "waited for a CPU": the process's threads spent more than `MAX_WAIT_FRACTION` of the block's wall time
      runnable but not running (the scheduler's run-queue wait). A quiet machine gives about 0 (0.03 at most on
      the 2-core VM this was tuned on); two busy processes beside a 2-thread loop give about 1. Sleeping (a host
      waiting for a GPU, for a DataLoader's workers) is not runnable, so it never counts.
    - "main thread off the CPU": where the wait readings are missing, a CPU block whose main thread ran for less
      than `MIN_MAIN_CPU_OVER_WALL` of the wall time (a CPU loop never waits for a device; 1.00 quiet, 0.5 under
      two busy processes). Not on CUDA, where the host may legitimately wait for the GPU.
    - "other runnable processes": at the block's start and at its end alike, more runnable processes that are
      not this one than the cores the torch threads leave free (a process seen at one end only came and went)."""
    if not isinstance(load, dict):
        return []
    reasons = []
    wall, wait = load.get("wall_s"), load.get("wait_s")
    if not (_real(wall) and wall > 0):
        return []
    if _real(wait):
        if wait / wall > MAX_WAIT_FRACTION:
            reasons.append("waited for a CPU")
    elif device != "cuda":
        ratio = main_cpu_over_wall(load)
        if ratio is not None and ratio < MIN_MAIN_CPU_OVER_WALL:
            reasons.append("main thread off the CPU")
    others, free = persistent_others(load), free_cores(load)
    if others is not None and free is not None and others > free:
        reasons.append("other runnable processes")
    return reasons


def persistent_others(load: dict) -> int | None:
    """Other runnable processes seen at both ends of a block: the smaller of the two counts."""
    others = load.get("others_running")
    values = [x for x in (others if isinstance(others, (list, tuple)) else [others]) if _real(x)]
    return int(min(values)) if values else None


def max_others(load) -> int | None:
    """The larger of a block's two counts of other runnable processes."""
    if not isinstance(load, dict):
        return None
    others = load.get("others_running")
    values = [x for x in (others if isinstance(others, (list, tuple)) else [others]) if _real(x)]
    return int(max(values)) if values else None


def free_cores(load: dict) -> int | None:
    """Cores the block's torch threads leave to other processes (None when unknown)."""
    cores, threads = load.get("cores"), load.get("threads")
    if not (_real(cores) and _real(threads)):
        return None
    return max(int(cores) - int(threads), 0)


def main_cpu_over_wall(load) -> float | None:
    """The main thread's CPU time over the block's wall time."""
    if not isinstance(load, dict):
        return None
    wall, main = load.get("wall_s"), load.get("main_cpu_s")
    return main / wall if _real(wall) and wall > 0 and _real(main) else None


def wait_fraction(load) -> float | None:
    """The time the process's threads waited for a CPU over the block's wall time."""
    if not isinstance(load, dict):
        return None
    wall, wait = load.get("wall_s"), load.get("wait_s")
    return wait / wall if _real(wall) and wall > 0 and _real(wait) else None


def reliability(loads, device: str | None, reference_loads=None, reference_name: str = "baseline") -> str | None:
    """"ok", or "unreliable: <why>" when interference (`block_interference`) was seen in any timed block of the
    cell or, for a ratio, in a block of its reference (the ratio divides by them); None when no block carries
    load readings."""
    own = [x for x in loads if isinstance(x, dict)] if isinstance(loads, (list, tuple)) else []
    ref = [x for x in reference_loads if isinstance(x, dict)] if isinstance(reference_loads, (list, tuple)) else []
    if not own:
        return None
    counts = []
    for name, blocks in (("its", own), (f"{reference_name}'s", ref)):
        hit = sum(1 for b in blocks if block_interference(b, device))
        if hit:
            counts.append(f"{hit} of {len(blocks)} of {name} timed blocks")
    if not counts:
        return "ok"
    disturbed = [b for b in own + ref if block_interference(b, device)]
    reasons = {r for b in disturbed for r in block_interference(b, device)}
    details = []
    if "waited for a CPU" in reasons:
        worst = max(w for w in (wait_fraction(b) for b in disturbed) if w is not None)
        details.append(f"its threads waited for a CPU for up to {worst:.0%} of a block's wall time "
                       f"(flagged above {MAX_WAIT_FRACTION:.0%}; about 0 on a quiet machine)")
    if "main thread off the CPU" in reasons:
        low = min(r for r in (main_cpu_over_wall(b) for b in disturbed) if r is not None)
        details.append(f"its main thread ran for {low:.0%} of a block's wall time at the least "
                       f"(flagged below {MIN_MAIN_CPU_OVER_WALL:.0%}; about 100 % on a quiet machine)")
    if "other runnable processes" in reasons:
        b = next(b for b in disturbed if "other runnable processes" in block_interference(b, device))
        most = max(n for n in (persistent_others(x) for x in disturbed) if n is not None)
        details.append(f"{most} other runnable process(es) throughout a block, with {int(b['threads'])} torch "
                       f"thread(s) on {int(b['cores'])} core(s)")
    return f"unreliable: interference in {' and '.join(counts)}: " + "; ".join(details)
