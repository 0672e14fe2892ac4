"""The results files: `results.csv` (one row per cell) and `results.json` (everything).

A cell is (workload, variant, device). Its record is a flat dict: the CSV columns below, plus the raw
data that only the JSON keeps (per-step times, memory traces, sync sites). Both files are rewritten
atomically (temporary file + rename) after every finished cell, so an interrupted run leaves valid files
that hold every finished cell.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import tempfile
from pathlib import Path

FORMAT = "loopmark-results"
FORMAT_VERSION = 1

CSV_COLUMNS = [
    "workload", "variant", "device", "device_name", "torch_version", "batch_size", "steps", "repeats",
    "samples_per_s", "step_time_median_s", "step_time_iqr_s", "step_time_ci_low_s", "step_time_ci_high_s",
    "ratio_to_baseline", "syncs_per_step", "ops_per_step", "peak_memory_bytes",
    "memory_growth_bytes_per_step", "retains_graph", "reported_loss", "exact_loss", "loss_rel_error",
    "param_max_rel_diff", "verdict", "expected_verdict", "energy_j_per_sample", "status", "error",
    # more than the required set
    "kind", "idiom", "verdict_reason", "ratio_ci_low", "ratio_ci_high", "noisy", "iqr_over_median",
    "syncs_per_step_cuda_debug", "tensor_growth_bytes_per_step", "rss_growth_bytes_per_step",
    "param_tensors", "warmup_steps", "warmup_time_s", "graph_breaks", "skipped_steps",
    "unsynced_reads_per_step", "ratio_to_floor",
]

# what only results.json keeps, per cell
RAW_FIELDS = ["step_times_s", "block_medians_s", "memory_trace_bytes", "sync_sites", "description"]

FINISHED = {"ok", "diverged", "oom", "error", "skipped"}
FLOOR_VARIANT = "cuda_graph_step"  # the whole step replayed as one CUDA graph: a workload's launch-overhead floor


def cell_key(record: dict) -> tuple[str, str, str]:
    return record["workload"], record["variant"], record["device"]


def set_floor_ratios(records: list[dict]) -> None:
    """`ratio_to_floor` of every CUDA training cell: its median step time over that of FLOOR_VARIANT on the same
    workload; None where the floor was not timed (on CPU there is none)."""
    floors = {r["workload"]: r["step_time_median_s"] for r in records
              if r["variant"] == FLOOR_VARIANT and r["device"] == "cuda" and positive(r.get("step_time_median_s"))}
    for r in records:
        floor = floors.get(r["workload"]) if r["device"] == "cuda" and r.get("kind", "train") == "train" else None
        time = r.get("step_time_median_s")
        r["ratio_to_floor"] = time / floor if floor and positive(time) else None


def positive(v) -> bool:
    """A finite number above zero (None, NaN and non-numbers are not)."""
    return isinstance(v, numbers.Real) and math.isfinite(v) and v > 0


def write_results(out_dir: Path, environment: dict, records: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    set_floor_ratios(records)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "environment": environment,
           "cells": [_clean(r) for r in records]}
    _atomic_write(out_dir / "results.json", lambda f: json.dump(doc, f, indent=1))
    _atomic_write(out_dir / "results.csv", lambda f: _write_csv(f, records))


def read_results(path: Path) -> dict:
    """Read a results.json (or the directory holding one); raises ValueError with a one-line reason."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a loopmark results file")
    return doc


def _write_csv(f, records: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})


def _csv_value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


def _clean(v):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
