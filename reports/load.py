"""Read results into (environment, DataFrame): a results directory, a results.json or a pytest-benchmark JSON.

The DataFrame has one row per cell and a column for every field of a cell record (bench.results):
numeric fields as float (NaN where null), `retains_graph`/`noisy` as True/False/None, raw data
(`step_times_s`, `memory_trace_bytes`, ...) as object columns holding lists/dicts or None.
The environment gains `source` (the file read) and `source_format` ("loopmark-results" or "pytest-benchmark").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.results import CSV_COLUMNS, FORMAT, FORMAT_VERSION, RAW_FIELDS, positive, set_floor_ratios
from reports.stats import median_ci, median_ratio_ci

PYTEST_BENCHMARK = "pytest-benchmark"
BASELINES = {"train": "baseline", "eval": "eval_baseline"}  # as loops.BASELINES, which imports torch
BOOL_COLUMNS = ["retains_graph", "noisy"]
TEXT_COLUMNS = [
    "workload", "variant", "device", "device_name", "torch_version", "verdict", "expected_verdict", "status",
    "error", "kind", "idiom", "verdict_reason",
]
NUMERIC_COLUMNS = [c for c in CSV_COLUMNS if c not in BOOL_COLUMNS and c not in TEXT_COLUMNS]
NOISY_IQR_OVER_MEDIAN = 0.1
DEVICE_ORDER = {"cpu": 0, "cuda": 1}


def load(path) -> tuple[dict, pd.DataFrame]:
    """Environment and one row per cell; raises ValueError with a one-line reason naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    doc = _read_json(path)
    try:
        if isinstance(doc, dict) and doc.get("format") == FORMAT:
            env, records = _from_results(doc)
            source_format = FORMAT
        elif isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list) and "machine_info" in doc:
            env, records = _from_pytest_benchmark(doc)
            source_format = PYTEST_BENCHMARK
        else:
            raise ValueError("not a loopmark results file nor a pytest-benchmark JSON")
        env = {**env, "source": str(path), "source_format": source_format}
        set_floor_ratios(records)
        return env, to_frame(records)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: {_one_line(exc)}") from None


def to_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record with every known column, typed as described in the module docstring."""
    df = pd.DataFrame.from_records(records)
    for column in CSV_COLUMNS + RAW_FIELDS:
        if column not in df.columns:
            df[column] = None
    for column in NUMERIC_COLUMNS:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    for column in BOOL_COLUMNS:
        df[column] = _objects([None if _is_null(v) else bool(v) for v in df[column]], df.index)
    for column in TEXT_COLUMNS:
        df[column] = _objects([None if _is_null(v) else str(v) for v in df[column]], df.index)
    df["kind"] = _objects([_kind(v, k) for k, v in zip(df["kind"], df["variant"])], df.index)
    return df


def _objects(values: list, index) -> pd.Series:
    """An object column: None stays None (pandas would turn strings into its str dtype, None into NaN)."""
    return pd.Series(values, index=index, dtype=object)


def by_workload_device(df: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """((workload, device), cells): workloads in file order, cpu before cuda, cells in display order."""
    workloads = list(dict.fromkeys(df["workload"]))
    keys = sorted(dict.fromkeys(zip(df["workload"], df["device"])),
                  key=lambda k: (workloads.index(k[0]), DEVICE_ORDER.get(k[1], len(DEVICE_ORDER)), k[1]))
    return [(k, in_display_order(df[(df["workload"] == k[0]) & (df["device"] == k[1])])) for k in keys]


def in_display_order(cells: pd.DataFrame) -> pd.DataFrame:
    """Training variants before evaluation ones, each baseline first, otherwise in file order."""
    rank = [(k == "eval", v not in BASELINES.values()) for k, v in zip(cells["kind"], cells["variant"])]
    order = sorted(range(len(cells)), key=lambda i: rank[i])
    return cells.iloc[order].reset_index(drop=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({_one_line(exc)})") from None


def _from_results(doc: dict) -> tuple[dict, list[dict]]:
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"loopmark results version {doc.get('version')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    cells = doc.get("cells")
    if not isinstance(cells, list):
        raise ValueError("loopmark results file without a list of cells")
    for i, cell in enumerate(cells):
        _check_record(cell, f"cell {i}")
    return dict(doc.get("environment") or {}), [dict(c) for c in cells]


def _from_pytest_benchmark(doc: dict) -> tuple[dict, list[dict]]:
    records = []
    for bench in doc["benchmarks"]:
        info = (bench.get("extra_info") or {}).get("loopmark")
        if info is None:
            continue  # a benchmark that is not a loopmark cell
        _check_record(info, f"benchmark {bench.get('fullname') or bench.get('name')!r}: extra_info.loopmark")
        records.append(_timed_record(info, bench.get("stats") or {}))
    if not records:
        raise ValueError("pytest-benchmark JSON without any loopmark benchmark (extra_info.loopmark)")
    _set_ratios(records)
    return _pytest_benchmark_environment(doc, records), records


def _check_record(record, what: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{what} is not an object")
    missing = [k for k in ("workload", "variant", "device") if not record.get(k)]
    if missing:
        raise ValueError(f"{what} has no {', '.join(missing)}")


def _timed_record(info: dict, stats: dict) -> dict:
    """The cell record with its timing fields taken from pytest-benchmark's stats.

    pytest-benchmark's stats are per iteration; one iteration runs `steps_per_round` steps (default 1).
    """
    record = {"status": "ok", **info}
    if stats.get("median") is None:
        return record
    steps_per_round = float(info.get("steps_per_round") or 1)
    data = stats.get("data")
    times = [float(t) / steps_per_round for t in data] if data else None
    median = float(stats["median"]) / steps_per_round
    iqr = float(stats["iqr"]) / steps_per_round if stats.get("iqr") is not None else None
    ci_low, ci_high = median_ci(times) if times and len(times) > 1 else (None, None)
    batch_size = info.get("batch_size")
    record.update(
        step_times_s=times,
        step_time_median_s=median,
        step_time_iqr_s=iqr,
        step_time_ci_low_s=ci_low,
        step_time_ci_high_s=ci_high,
        samples_per_s=batch_size / median if batch_size and median > 0 else None,
        iqr_over_median=iqr / median if iqr is not None and median > 0 else None,
    )
    spread = record["iqr_over_median"]
    record["noisy"] = spread is not None and spread > NOISY_IQR_OVER_MEDIAN
    if record.get("steps") is None and stats.get("rounds"):
        record["steps"] = int(stats["rounds"] * steps_per_round)
    return record


def _set_ratios(records: list[dict]) -> None:
    """ratio_to_baseline (and its bootstrap CI when both have raw times) against the baseline of the same
    workload, device and kind."""
    baselines = {(r["workload"], r["device"], _kind(r["variant"], r.get("kind"))): r
                 for r in records if r["variant"] in BASELINES.values()}
    for r in records:
        base = baselines.get((r["workload"], r["device"], _kind(r["variant"], r.get("kind"))))
        r["ratio_to_baseline"] = r["ratio_ci_low"] = r["ratio_ci_high"] = None
        medians = [base.get("step_time_median_s"), r.get("step_time_median_s")] if base else []
        if not medians or not all(map(positive, medians)):
            continue
        r["ratio_to_baseline"] = r["step_time_median_s"] / base["step_time_median_s"]
        if r is base:
            continue
        base_times, times = base.get("step_times_s"), r.get("step_times_s")
        if base_times and times and len(base_times) > 1 and len(times) > 1:
            r["ratio_ci_low"], r["ratio_ci_high"] = median_ratio_ci(base_times, times)


def _pytest_benchmark_environment(doc: dict, records: list[dict]) -> dict:
    machine = doc.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    commit = doc.get("commit_info") or {}
    gpu_names = [r.get("device_name") for r in records if r["device"] == "cuda" and r.get("device_name")]
    env = {
        "command": "pytest --benchmark-json",
        "timestamp": doc.get("datetime"),
        "pytest_benchmark": doc.get("version"),
        "python": machine.get("python_version"),
        "torch": next((r["torch_version"] for r in records if r.get("torch_version")), None),
        "cpu_model": cpu.get("brand_raw") or machine.get("processor") or None,
        "cpu_cores": cpu.get("count"),
        "os": " ".join(x for x in (machine.get("system"), machine.get("release")) if x) or None,
        "host": machine.get("node"),
        "commit": commit.get("id"),
        "branch": commit.get("branch"),
        "dirty": commit.get("dirty"),
        "gpu": {"name": gpu_names[0]} if gpu_names else None,
    }
    if isinstance(machine.get("loopmark"), dict):  # a benchmark session may add loopmark's own environment
        env.update(machine["loopmark"])
    return env


def _kind(variant, kind=None) -> str:
    if kind in BASELINES:
        return kind
    return "eval" if isinstance(variant, str) and variant.startswith("eval_") else "train"


def _is_null(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, np.floating) and np.isnan(v)


def _one_line(exc: BaseException) -> str:
    text = str(exc) if str(exc) else type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing field {text}"
    return " ".join(text.split())
