"""Read results into (environment, DataFrame): a results directory, a results.json or a pytest-benchmark JSON.

The DataFrame has one row per cell and a column for every field of a cell record (`reports.results`):
numeric fields as float (NaN where null), boolean fields as True/False/None, raw data (`step_times_s`,
`memory_trace_bytes`, ...) as object columns holding lists/dicts or None. The environment gains `source`
(the file read) and `source_format` ("loopmark-results" or "pytest-benchmark").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reports import results, stats
from reports.results import BOOL_COLUMNS, CSV_COLUMNS, NUMERIC_COLUMNS, RAW_FIELDS, TEXT_COLUMNS

PYTEST_BENCHMARK = "pytest-benchmark"
DEVICE_ORDER = {"cpu": 0, "cuda": 1}


def load(path) -> tuple[dict, pd.DataFrame]:
    """Environment and one row per cell; raises ValueError with a one-line reason naming the file."""
    env, records = load_records(path)
    return env, to_frame(records)


def load_records(path) -> tuple[dict, list[dict]]:
    """Environment and the cell records of a loopmark results file or a pytest-benchmark JSON."""
    path = results.results_file(path)
    doc = results.read_json(path)
    try:
        if isinstance(doc, dict) and doc.get("format") == results.FORMAT:
            env, records = results.parse_results(doc, path)
            source_format = results.FORMAT
        elif isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list) and "machine_info" in doc:
            env, records = _from_pytest_benchmark(doc)
            source_format = PYTEST_BENCHMARK
        else:
            raise ValueError("not a loopmark results file nor a pytest-benchmark JSON")
    except ValueError as exc:
        message = results.one_line(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: {results.one_line(exc)}") from None
    return {**env, "source": str(path), "source_format": source_format}, records


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
    rank = [(k == "eval", v != b) for k, v, b in zip(cells["kind"], cells["variant"], cells["baseline_variant"])]
    order = sorted(range(len(cells)), key=lambda i: rank[i])
    return cells.iloc[order].reset_index(drop=True)


def is_baseline(cell) -> bool:
    """Whether a record (dict or DataFrame row) is its kind's baseline, as the harness decided."""
    return cell["variant"] == cell["baseline_variant"]


def _from_pytest_benchmark(doc: dict) -> tuple[dict, list[dict]]:
    records = []
    for bench in doc["benchmarks"]:
        info = (bench.get("extra_info") or {}).get("loopmark")
        if info is None:
            continue  # a benchmark that is not a loopmark cell
        results.check_record(info, f"benchmark {bench.get('fullname') or bench.get('name')!r}: "
                                   "extra_info.loopmark")
        record = _timed_record(info, bench.get("stats") or {})
        if not record.get("test_id") and isinstance(bench.get("fullname"), str):  # written before the plugin said it
            record["test_id"] = bench["fullname"]
        records.append(record)
    if not records:
        raise ValueError("pytest-benchmark JSON without any loopmark benchmark (extra_info.loopmark)")
    results.derive(records)
    return _pytest_benchmark_environment(doc, records), records


def _timed_record(info: dict, timing: dict) -> dict:
    """The cell record with its timing fields taken from pytest-benchmark's stats.

    pytest-benchmark's stats are per iteration; one iteration runs `steps_per_round` steps (default 1).
    With raw data (`--benchmark-save-data`, or its JSON's `data`) the statistics come from
    `reports.stats.summarize`, as for any run; without, from pytest-benchmark's own median and IQR.
    """
    record = {"status": "ok", **info}
    if timing.get("median") is None:
        return record
    steps_per_round = float(info.get("steps_per_round") or 1)
    data = timing.get("data")
    times = [float(t) / steps_per_round for t in data] if data else None
    if times and len(times) > 1:
        record.update(step_times_s=times, **stats.summarize(times))
    else:
        median = float(timing["median"]) / steps_per_round
        iqr = float(timing["iqr"]) / steps_per_round if timing.get("iqr") is not None else None
        spread = iqr / median if iqr is not None and median > 0 else None
        record.update(step_times_s=times, step_time_median_s=median, step_time_iqr_s=iqr,
                      step_time_ci_low_s=None, step_time_ci_high_s=None, iqr_over_median=spread,
                      noisy=stats.is_noisy(spread))
    median, batch_size = record["step_time_median_s"], info.get("batch_size")
    record["samples_per_s"] = batch_size / median if batch_size and median > 0 else None
    if record.get("steps") is None and timing.get("rounds"):
        record["steps"] = int(timing["rounds"] * steps_per_round)
    return record


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


def _is_null(v) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, np.floating) and np.isnan(v)

