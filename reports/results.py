"""The results schema: what a cell record holds, how results files are read and written, and the rules
every reader shares. Torch-free: `bench` measures and writes through it, `reports` reads through it.

A cell is (workload, variant, device). Its record is what ran (`CellSpec`, frozen: workload, variant,
device, settings, the harness's decisions) plus what was measured (`Measurement`: the untimed passes'
figures and the raw per-step times of every timed block). `record()` flattens the two and derives every
statistic from the raw samples (`reports.stats`); `derive()` adds what depends on other cells (ratios to the
baseline and to the floor) and is run whenever records are written or read, so the numbers in one file
always agree with each other.

`results.csv` holds one row per cell (`CSV_COLUMNS`); `results.json` holds everything, raw data included
(`RAW_FIELDS`). Both are rewritten atomically after every finished cell.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reports import stats

FORMAT = "loopmark-results"
FORMAT_VERSION = 1

VERDICTS = ("identical", "equivalent", "different", "unverified", "broken")  # from best to worst
BASELINES = {"train": "baseline", "eval": "eval_baseline"}  # each kind's yardstick variant
FLOOR_VARIANT = "cuda_graph_step"  # the whole step replayed as one CUDA graph: a workload's launch-overhead floor
FINISHED = {"ok", "diverged", "oom", "error", "skipped"}

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
    "unsynced_reads_per_step", "ratio_to_floor", "baseline_variant", "verdict_as_expected",
    "allocator_counter_peak_bytes",
]
# what only results.json keeps, per cell
RAW_FIELDS = ["step_times_s", "block_medians_s", "memory_trace_bytes", "sync_sites", "description"]
BOOL_COLUMNS = ["retains_graph", "noisy", "verdict_as_expected"]
TEXT_COLUMNS = [
    "workload", "variant", "device", "device_name", "torch_version", "verdict", "expected_verdict", "status",
    "error", "kind", "idiom", "verdict_reason", "baseline_variant",
]
NUMERIC_COLUMNS = [c for c in CSV_COLUMNS if c not in BOOL_COLUMNS and c not in TEXT_COLUMNS]
COUNT_COLUMNS = {"batch_size", "steps", "repeats", "warmup_steps", "param_tensors", "peak_memory_bytes",
                 "allocator_counter_peak_bytes"}


# -- the rules ------------------------------------------------------------------------------------------

def baseline_of(kind: str | None) -> str:
    """The variant every cell of this kind is timed and checked against."""
    return BASELINES.get(kind or "train", BASELINES["train"])


def verdict_matches(measured: str | None, expected: str | None) -> bool:
    """Whether a measured verdict meets the declared one. `equivalent` (equal within rounding) is also met
    by `identical`: a float32 running mean can round to exactly the float64 value on a short run."""
    return measured == expected or (expected == "equivalent" and measured == "identical")


def as_expected(status: str | None, verdict: str | None, expected: str | None) -> bool | None:
    """Whether a cell's verdict is what it declares; None when nothing is declared or the cell was skipped."""
    if not expected or status == "skipped":
        return None
    return verdict_matches(verdict, expected)


def positive(v) -> bool:
    """A finite number above zero (None, NaN and non-numbers are not)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def cell_key(record: dict) -> tuple[str, str, str]:
    return record["workload"], record["variant"], record["device"]


# -- a record: what ran + what was measured ---------------------------------------------------------------

@dataclass(frozen=True)
class CellSpec:
    """What ran: the cell, its settings and the harness's decisions about it."""

    workload: str
    variant: str
    kind: str
    device: str
    idiom: str = ""
    description: str = ""
    device_name: str | None = None
    torch_version: str | None = None
    batch_size: int | None = None
    steps: int | None = None
    repeats: int | None = None
    warmup_steps: int | None = None
    expected_verdict: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.workload, self.variant, self.device

    @property
    def baseline_variant(self) -> str:
        return baseline_of(self.kind)


@dataclass
class Measurement:
    """What was measured: a status, the untimed passes' figures, and the raw per-step times of each timed
    block (statistics are derived from them by `record`, never stored here)."""

    status: str = "ok"
    error: str | None = None
    figures: dict = field(default_factory=dict)  # correctness, syncs, memory: each pass's own fields
    blocks: list[list[float]] = field(default_factory=list)  # per-step seconds, one list per timed block
    energy_j: list[float] = field(default_factory=list)  # per timed block, where the GPU reports it

    def fault(self, status: str, error: str) -> None:
        self.status, self.error = status, error


def record(spec: CellSpec, m: Measurement, seed: int = stats.SEED) -> dict:
    """The flat record written to results.json/csv: spec, figures, and statistics of the raw samples."""
    r = {**dataclasses.asdict(spec), "baseline_variant": spec.baseline_variant, **m.figures,
         "status": m.status, "error": m.error}
    samples = [t for block in m.blocks for t in block]
    r["step_times_s"] = samples
    r["block_medians_s"] = [float(np.median(b)) for b in m.blocks if b]
    if samples:
        r.update(stats.summarize(samples, seed))
        if spec.batch_size:
            r["samples_per_s"] = spec.batch_size / r["step_time_median_s"]
        if m.energy_j and sum(m.energy_j) > 0 and spec.batch_size:
            r["energy_j_per_sample"] = sum(m.energy_j) / (len(samples) * spec.batch_size)
    r["verdict_as_expected"] = as_expected(r["status"], r.get("verdict"), r.get("expected_verdict"))
    return r


def derive(records: list[dict], seed: int = stats.SEED) -> list[dict]:
    """Fill in, in place, what a record's value depends on other records for: `baseline_variant`,
    `verdict_as_expected`, `ratio_to_baseline` with its CI (against the baseline of the same workload,
    device and kind in these records) and `ratio_to_floor` (CUDA training cells)."""
    for r in records:
        if not r.get("baseline_variant"):
            r["baseline_variant"] = baseline_of(r.get("kind"))
        r["verdict_as_expected"] = as_expected(r.get("status"), r.get("verdict"), r.get("expected_verdict"))
    bases = {(r["workload"], r["device"], r["baseline_variant"]): r for r in records
             if r["variant"] == r["baseline_variant"]}
    for r in records:
        base = bases.get((r["workload"], r["device"], r["baseline_variant"]))
        r["ratio_to_baseline"] = r["ratio_ci_low"] = r["ratio_ci_high"] = None
        if base is None or not (positive(base.get("step_time_median_s")) and positive(r.get("step_time_median_s"))):
            continue
        r["ratio_to_baseline"] = r["step_time_median_s"] / base["step_time_median_s"]
        times, base_times = r.get("step_times_s"), base.get("step_times_s")
        if r is not base and times and base_times and len(times) > 1 and len(base_times) > 1:
            r["ratio_ci_low"], r["ratio_ci_high"] = stats.median_ratio_ci(base_times, times, seed=seed)
    floors = {r["workload"]: r["step_time_median_s"] for r in records
              if r["variant"] == FLOOR_VARIANT and r["device"] == "cuda" and positive(r.get("step_time_median_s"))}
    for r in records:
        floor = floors.get(r["workload"]) if r["device"] == "cuda" and r.get("kind", "train") == "train" else None
        time = r.get("step_time_median_s")
        r["ratio_to_floor"] = time / floor if floor and positive(time) else None
    return records


# -- files ----------------------------------------------------------------------------------------------

def write_results(out_dir: Path, environment: dict, records: list[dict]) -> None:
    """results.json and results.csv in `out_dir`, each replaced atomically (temporary file + rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    derive(records)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "environment": environment,
           "cells": [_clean(r) for r in records]}
    atomic_write(out_dir / "results.json", json.dumps(doc, indent=1))
    atomic_write(out_dir / "results.csv", csv_text(records))


def read_results(path) -> tuple[dict, list[dict]]:
    """(environment, records) of a results.json (or the directory holding one), checked and derived;
    raises ValueError with a one-line reason naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a loopmark results file")
    return parse_results(doc, path)


def parse_results(doc: dict, path) -> tuple[dict, list[dict]]:
    """(environment, records) of a loaded loopmark results document."""
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: loopmark results version {doc.get('version')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    cells = doc.get("cells")
    if not isinstance(cells, list):
        raise ValueError(f"{path}: loopmark results file without a list of cells")
    for i, cell in enumerate(cells):
        check_record(cell, f"{path}: cell {i}")
    return dict(doc.get("environment") or {}), derive([dict(c) for c in cells])


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({one_line(exc)})") from None


def check_record(record, what: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{what} is not an object")
    missing = [k for k in ("workload", "variant", "device") if not record.get(k)]
    if missing:
        raise ValueError(f"{what} has no {', '.join(missing)}")


def csv_text(records: list[dict]) -> str:
    """results.csv: CSV_COLUMNS, one row per record, nulls and NaN as empty fields, counts as integers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([_csv_value(c, r.get(c)) for c in CSV_COLUMNS])
    return out.getvalue()


def _csv_value(column: str, v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if column in COUNT_COLUMNS and isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _clean(v):
    """JSON has no NaN/inf: write them as null; numpy scalars as Python numbers."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def atomic_write(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` in one step: a temporary file in the same directory, then a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing
        os.replace(tmp, path)
    except BaseException:  # an interrupt may land after the rename: then there is nothing to remove
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def one_line(exc: BaseException) -> str:
    text = str(exc) if str(exc) else type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing field {text}"
    return " ".join(text.split())
