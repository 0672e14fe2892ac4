"""The results schema: what a cell record holds, how results files are read and written, and the rules
every reader shares. Torch-free: `bench` measures and writes through it, `reports` reads through it.

A cell is (workload, variant, device). Its record is what ran (`CellSpec`, frozen: workload, variant,
device, settings, the harness's decisions) plus what was measured (`Measurement`: the untimed passes'
figures and the raw per-step times of every timed block). `record()` flattens the two and derives every
statistic from the raw samples (`reports.stats`); `derive()` adds what depends on other cells (ratios to the
baseline and to the floor) and is run whenever records are written or read, so the numbers in one file
always agree with each other.

`results.csv` holds one row per cell (`CSV_COLUMNS`); `results.json` holds everything, raw data included
(`RAW_FIELDS`). Both are rewritten atomically after every finished cell, results.json first: it is the source
of truth and carries the SHA-256 of the results.csv written with it (`csv_sha256`), so a results.csv left
behind by an interrupt between the two is found and rewritten from results.json when the run is resumed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import numbers
import os
import signal
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reports import stats

FORMAT = "loopmark-results"
FORMAT_VERSION = 1

# from best to worst; `consistent`: every step consumed what its backward passes produced, with no baseline to compare
# with (a workload the built-in loop cannot run, a traced script)
VERDICTS = ("identical", "equivalent", "consistent", "different", "unverified", "broken")
BASELINES = {"train": "baseline", "eval": "eval_baseline", "ddp": "ddp_baseline"}  # each kind's yardstick variant
FLOOR_VARIANT = "cuda_graph_step"  # the whole step replayed as one CUDA graph: a workload's launch-overhead floor
TRACE_VARIANT = "trace"  # the variant of a script measured by `loopmark trace` (its workload: the script's name)
# a cell's status once it is finished: ok, or skipped, or one of the faults that stay in their cell (`timeout`: it ran
# past `loopmark run --cell-timeout`)
FAULTS = ("error", "timeout", "diverged", "oom")
FINISHED = {"ok", "skipped", *FAULTS}

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
    # growth with its error and what it means (`derive`); timing reliability from each block's load readings
    "memory_growth_se_bytes_per_step", "memory_growth_class", "reliability", "cpu_wait_fraction_max",
    "main_cpu_over_wall_min", "others_running_max",
    # distributed cells: processes, and the collectives per optimizer step with the bytes they send (the worst rank's)
    "ranks", "collectives_per_step", "comm_bytes_per_step",
    # a cell measured by the pytest plugin: the test that measured it (its node id), which names its row in a report
    "test_id",
]
# what only results.json keeps, per cell
RAW_FIELDS = ["step_times_s", "block_medians_s", "memory_trace_bytes", "sync_sites", "description",
              "sync_kinds", "sync_site_details", "block_load", "timing_rounds",
              # distributed cells: per rank, in rank order, and which collectives from where
              "rank_syncs_per_step", "rank_peak_memory_bytes", "rank_memory_growth_bytes_per_step",
              "rank_collectives_per_step", "rank_comm_bytes_per_step", "rank_block_medians_s", "collective_ops",
              "collective_sites"]
BOOL_COLUMNS = ["retains_graph", "noisy", "verdict_as_expected"]
TEXT_COLUMNS = [
    "workload", "variant", "device", "device_name", "torch_version", "verdict", "expected_verdict", "status",
    "error", "kind", "idiom", "verdict_reason", "baseline_variant", "memory_growth_class", "reliability", "test_id",
]
NUMERIC_COLUMNS = [c for c in CSV_COLUMNS if c not in BOOL_COLUMNS and c not in TEXT_COLUMNS]
COUNT_COLUMNS = {"batch_size", "steps", "repeats", "warmup_steps", "param_tensors", "peak_memory_bytes",
                 "allocator_counter_peak_bytes", "ranks"}


# -- the rules ------------------------------------------------------------------------------------------

# a sync site is `file:line` of the innermost frame outside torch and loopmark; where that frame is a library's (an
# installed package), the nearest frame of the user's own code follows: `<site-packages>/pkg/m.py:134 from train.py:42`
SITE_CALLER = " from "


def site_file(site: str) -> str:
    """A sync site without its line numbers (`pkg/mod.py from train.py`): where the same code is, wherever it moved."""
    return SITE_CALLER.join(part.rpartition(":")[0] for part in site.split(SITE_CALLER))


def site_code(detail: dict) -> str:
    """The source of a `sync_site_details` entry as shown: its line's, then its caller's after `SITE_CALLER`."""
    return SITE_CALLER.join(str(c) for c in (detail.get("code"), detail.get("caller_code")) if c)


def trace_device(cell) -> str:
    """Where a traced script's tensors were, as its heading and report say it: on a GPU, on the CPU standing for one
    (whose count is the CUDA count), or on the CPU alone (a script that never asked for CUDA: its count is not a CUDA
    count). `reached_device` is absent from traces made before it was recorded."""
    reached = cell.get("reached_device")
    if cell.get("device") == "cuda":
        return "cuda" + (" (the script kept its tensors on the CPU: none reached the GPU)" if reached is False else "")
    if reached is False:
        return ("cpu (the script kept its tensors on the CPU: none reached the stand-in GPU, so its syncs are the "
                "CPU run's, not the CUDA count)")
    return "cpu (the CUDA count, with cpu:0 standing for the GPU)"


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
    ranks: int | None = None  # a distributed cell's processes (its batch_size is the global batch, all ranks')

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
    # per timed block, read just outside it (`bench.timing.LoadWatch`): wall and CPU seconds, other runnable processes
    block_load: list[dict] = field(default_factory=list)

    def fault(self, status: str, error: str) -> None:
        self.status, self.error = status, error


def record(spec: CellSpec, m: Measurement, seed: int = stats.SEED) -> dict:
    """The flat record written to results.json/csv: spec, figures, and statistics of the raw samples."""
    r = {**dataclasses.asdict(spec), "baseline_variant": spec.baseline_variant, **m.figures,
         "status": m.status, "error": m.error}
    samples = [t for block in m.blocks for t in block]
    r["step_times_s"] = samples
    r["block_medians_s"] = [float(np.median(b)) for b in m.blocks if b]
    r["block_load"] = [dict(x) for x in m.block_load] or None
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
    device and kind in these records), `reliability` (interference seen in its timed blocks or its baseline's),
    `ratio_to_floor` (CUDA training cells), and the memory growth's error and class (`growth`).

    The ratio is `stats.block_ratio_with_ci` of `stats.block_ratios`, the per-block samples `loopmark compare` gates
    on: the median over timed blocks of (block median / the baseline's block median of the same round), with a 95 %
    interval over blocks.
    A cell whose blocks do not pair with its baseline's (a pytest-benchmark file: each test timed on its own; a cell
    kept by `--resume` beside a re-timed baseline: `timing_rounds` differ) gets the ratio of the median step times,
    its CI over single steps, and a `reliability` saying so."""
    for r in records:
        if not r.get("baseline_variant"):
            r["baseline_variant"] = baseline_of(r.get("kind"))
        r["verdict_as_expected"] = as_expected(r.get("status"), r.get("verdict"), r.get("expected_verdict"))
        growth(r)
        loads = r.get("block_load") if isinstance(r.get("block_load"), list) else []
        ratios = [x for x in map(stats.main_cpu_over_wall, loads) if x is not None]
        waits = [x for x in map(stats.wait_fraction, loads) if x is not None]
        others = [x for x in map(stats.max_others, loads) if x is not None]
        r["main_cpu_over_wall_min"] = min(ratios) if ratios else None
        r["cpu_wait_fraction_max"] = max(waits) if waits else None
        r["others_running_max"] = max(others) if others else None
        r["reliability"] = stats.reliability(loads, r.get("device"))
    bases = {(r["workload"], r["device"], r["baseline_variant"]): r for r in records
             if r["variant"] == r["baseline_variant"]}
    for r in records:
        base = bases.get((r["workload"], r["device"], r["baseline_variant"]))
        r["ratio_to_baseline"] = r["ratio_ci_low"] = r["ratio_ci_high"] = None
        if base is None or not (positive(base.get("step_time_median_s")) and positive(r.get("step_time_median_s"))):
            continue
        if r is base:
            r["ratio_to_baseline"] = 1.0
            continue
        # blocks pair up when they were timed in the same rounds: not a cell kept by --resume beside a re-timed baseline
        same_rounds = r.get("timing_rounds") == base.get("timing_rounds")
        paired = stats.block_ratio_with_ci(r.get("block_medians_s"), base.get("block_medians_s")) \
            if same_rounds else None
        if paired is not None:
            r["ratio_to_baseline"], r["ratio_ci_low"], r["ratio_ci_high"] = paired
            r["reliability"] = stats.reliability(r.get("block_load"), r.get("device"), base.get("block_load"),
                                                 r["baseline_variant"])
            continue
        r["ratio_to_baseline"] = r["step_time_median_s"] / base["step_time_median_s"]
        times, base_times = r.get("step_times_s"), base.get("step_times_s")
        if times and base_times and len(times) > 1 and len(base_times) > 1:
            r["ratio_ci_low"], r["ratio_ci_high"] = stats.median_ratio_ci(base_times, times, seed=seed)
            r["reliability"] = (f"unreliable: not timed in rounds with {r['baseline_variant']} (no paired blocks): "
                                "the ratio is of the median step times and its interval treats single steps as "
                                "independent, which they are not")
    floors = {r["workload"]: r["step_time_median_s"] for r in records
              if r["variant"] == FLOOR_VARIANT and r["device"] == "cuda" and positive(r.get("step_time_median_s"))}
    for r in records:
        floor = floors.get(r["workload"]) if r["device"] == "cuda" and r.get("kind", "train") == "train" else None
        time = r.get("step_time_median_s")
        r["ratio_to_floor"] = time / floor if floor and positive(time) else None
    return records


def growth(r: dict) -> None:
    """`memory_growth_se_bytes_per_step` (where the harness did not record it: from `memory_trace_bytes` when that
    is the series the growth was fitted to) and `memory_growth_class` ("leak", "grows", "none": `stats.growth_class`)
    of a record, in place."""
    slope, se = r.get("memory_growth_bytes_per_step"), r.get("memory_growth_se_bytes_per_step")
    trace = r.get("memory_trace_bytes")
    n = len(trace) - 1 if isinstance(trace, list) and len(trace) > 3 else None
    if not isinstance(se, numbers.Real) and isinstance(slope, numbers.Real) and n is not None:
        fitted, fitted_se, n = stats.growth_per_step(trace)
        if math.isfinite(fitted) and abs(fitted - slope) <= 1e-6 * max(1.0, abs(slope)):
            se = fitted_se
    r["memory_growth_se_bytes_per_step"] = se if isinstance(se, numbers.Real) and math.isfinite(se) else None
    r["memory_growth_class"] = stats.growth_class(slope, r["memory_growth_se_bytes_per_step"], n)


# -- files ----------------------------------------------------------------------------------------------

def write_results(out_dir: Path, environment: dict, records: list[dict]) -> None:
    """results.json and results.csv in `out_dir`, each replaced atomically (temporary file + rename): results.json
    first, holding the SHA-256 of the results.csv written with it, which is made from the same cells. Ctrl-C waits
    until both are written. A file that cannot be written raises `OutputError` and keeps its earlier version."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out_dir, exc) from None
    derive(records)
    cells = [_clean(r) for r in records]
    table = csv_text(cells)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "environment": environment, "csv_sha256": _sha256(table),
           "cells": cells}
    with _interrupts_deferred():
        atomic_write(out_dir / "results.json", json.dumps(doc, indent=1))
        atomic_write(out_dir / "results.csv", table)


def _mend_csv(doc: dict, path: Path) -> None:
    """Rewrite, from the cells of a results.json, the results.csv beside it that is not the one written with it (an
    interrupt or a full disk between the two writes): done by the run that owns the directory (`read_results(...,
    mend=True)`: `run --resume`), never by a reader of it (report, compare, merge). Files without `csv_sha256` (written
    before it existed) and directories that cannot be written are left as they are."""
    expected, path = doc.get("csv_sha256"), Path(path)
    if not isinstance(expected, str) or path.name != "results.json":
        return
    csv_path = path.with_name("results.csv")
    try:
        if csv_path.exists() and (not csv_path.is_file() or _sha256(csv_path.read_bytes()) == expected):
            return  # the pair, or not a file of ours (a FIFO, /dev/null): left alone
    except OSError:
        return
    with contextlib.suppress(OSError):
        atomic_write(csv_path, csv_text(doc["cells"]))


def _sha256(content: str | bytes) -> str:
    return hashlib.sha256(content.encode("utf-8") if isinstance(content, str) else content).hexdigest()


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C (SIGINT) during the block takes effect when the block has run, as it would have without it.
    Python handles signals in the main thread only, where a handler set from Python can be swapped."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(signal.SIGINT, pending[0])
        elif pending and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def read_results(path, mend: bool = False) -> tuple[dict, list[dict]]:
    """(environment, records) of a results.json (or the directory holding one), checked and derived;
    raises ValueError with a one-line reason naming the file. `mend`: the caller writes this run (`run --resume`), and
    a results.csv left behind beside it is rewritten (`_mend_csv`)."""
    path = results_file(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a loopmark results file")
    return parse_results(doc, path, mend)


def results_file(path) -> Path:
    """The results file `path` names: itself, or the results.json of the directory `path`; ValueError (one line)
    for a directory without one."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not os.path.lexists(path / "results.json"):
        raise ValueError(f"{path}: not a results directory (it holds no results.json)")
    return path / "results.json"


def parse_results(doc: dict, path, mend: bool = False) -> tuple[dict, list[dict]]:
    """(environment, records) of a loaded loopmark results document (`mend`: as for `read_results`)."""
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: loopmark results version {doc.get('version')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    cells = doc.get("cells")
    if not isinstance(cells, list):
        raise ValueError(f"{path}: loopmark results file without a list of cells")
    for i, cell in enumerate(cells):
        check_record(cell, f"{path}: cell {i}")
    if mend:
        _mend_csv(doc, path)
    return dict(doc.get("environment") or {}), derive([dict(c) for c in cells])


MAX_INPUT_BYTES = 512 * 2**20  # a results file larger than this is refused (a full run's results.json: a few MiB)


def read_json(path: Path):
    """The JSON document in the regular file `path`; ValueError, one line naming it, for anything else: no such
    file, a directory, a FIFO or device (`/dev/zero`: refused, never read), a file over `MAX_INPUT_BYTES`, text that
    is not JSON, or JSON nested too deeply to parse."""
    try:
        _check_input(path, os.stat(path))  # a FIFO or a device is refused before it is opened
        # O_NONBLOCK: should a FIFO take the file's place meanwhile, opening it returns at once instead of waiting
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            _check_input(path, os.fstat(f.fileno()))
            data = f.read(MAX_INPUT_BYTES + 1)  # bounded, should the file grow while it is read
        if len(data) > MAX_INPUT_BYTES:
            raise ValueError(f"{path}: more than the {MAX_INPUT_BYTES:,} bytes a results file may have")
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory") from None
    except RecursionError:  # json's parser recurses once per level of [ or {
        raise ValueError(f"{path}: not readable JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({one_line(exc)})") from None
    except ValueError as exc:  # an integer of more digits than Python converts (`int_max_str_digits`)
        if str(exc).startswith(str(path)):  # refused before it was read
            raise
        raise ValueError(f"{path}: not readable JSON ({one_line(exc)})") from None


def _check_input(path, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_size > MAX_INPUT_BYTES:
        raise ValueError(f"{path}: {info.st_size:,} bytes, more than the {MAX_INPUT_BYTES:,} a results file may have")


def check_record(record, what: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{what} is not an object")
    missing = [k for k in ("workload", "variant", "device") if not record.get(k)]
    if missing:
        raise ValueError(f"{what} has no {', '.join(missing)}")
    other = [k for k in TEXT_COLUMNS if record.get(k) is not None and not isinstance(record[k], str)]
    if other:
        raise ValueError(f"{what}: {', '.join(other)} {'is' if len(other) == 1 else 'are'} not text")
    for name, v in _numbers(record):
        problem = "is not a number" if isinstance(v, bool) or not isinstance(v, numbers.Real) else \
            "is beyond the range of a float" if isinstance(v, int) and abs(v) > _FLOAT_MAX else None
        if problem:
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:36] + " ..."
            raise ValueError(f"{what}: {name} {problem} ({shown})")


NUMBER_LISTS = ("step_times_s", "block_medians_s", "memory_trace_bytes")  # raw fields: lists of numbers
NUMBER_MAPS = ("sync_sites", "collective_sites")  # raw fields: {site: a count}
_FLOAT_MAX = int(np.finfo(float).max)


def _numbers(record: dict):
    """(name, value) of every value of `record` that must be a number (null aside)."""
    for k in NUMERIC_COLUMNS:
        if record.get(k) is not None:
            yield k, record[k]
    for k in NUMBER_LISTS:
        if isinstance(record.get(k), list):
            yield from ((f"{k}[{i}]", v) for i, v in enumerate(record[k]) if v is not None)
    for k in NUMBER_MAPS:
        if isinstance(record.get(k), dict):
            yield from ((f"{k}[{site!r}]", v) for site, v in record[k].items() if v is not None)


def csv_text(records: list[dict]) -> str:
    """results.csv: CSV_COLUMNS, one row per record, nulls and NaN as empty fields, counts as integers, text that
    would start a formula led by `'` (`_csv_value`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        writer.writerow([_csv_value(c, r.get(c)) for c in CSV_COLUMNS])
    return out.getvalue()


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting with one as a formula


def _csv_value(column: str, v):
    """A cell of results.csv. Text that starts like a formula gets a `'` before it, as spreadsheets write such text, so
    that a name or a message opened in one is shown, never run; numbers (negative ones too) are written as they are."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if column in COUNT_COLUMNS and isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.startswith(FORMULA_PREFIXES):
        return "'" + v
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
    """Replace `path` with `content` in one step: a temporary file in the same directory, then a rename. Every
    output file is written through it. An OSError (a full disk, a read-only directory) becomes `OutputError`;
    `path` then still holds what it held."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise OutputError(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing
        os.replace(tmp, path)
    except BaseException as exc:  # an interrupt may land after the rename: then there is nothing to remove
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(path, exc) from None
        raise


class OutputError(OSError):
    """An output file or directory could not be written; its message is one line naming it."""

    def __init__(self, path, exc: OSError):
        super().__init__(f"cannot write {path} ({exc.strerror or one_line(exc)})")


# -- where a run's results go ------------------------------------------------------------------------------

LATEST = "latest"  # under a results root: a symlink to the newest run directory


def remove_report(directory) -> None:
    """Remove the report in `directory` (report.md, report.html, plot_*.png): results written there that it was not made
    from must not stand beside it."""
    directory = Path(directory)
    for stale in [directory / "report.md", directory / "report.html", *directory.glob("plot_*.png")]:
        stale.unlink(missing_ok=True)


def holds_results(directory) -> bool:
    """Whether `directory` holds the results of a run (results.json or results.csv)."""
    return any((Path(directory) / name).exists() for name in ("results.json", "results.csv"))


class SetAside:
    """A run's results moved out of the way (`set_aside`) while another run is written in their place."""

    NAMES = ("results.json", "results.csv")

    def __init__(self, directory):
        self.directory, self.held = Path(directory), []
        for name in self.NAMES:
            path = self.directory / name
            if path.exists():
                os.replace(path, self.directory / f".{name}.overwritten")
                self.held.append(name)

    def settle(self) -> None:
        """Drop the old results if the new run saved a cell; otherwise put them back."""
        replaced = (self.directory / "results.json").exists()
        for name in self.held:
            kept = self.directory / f".{name}.overwritten"
            if replaced:
                kept.unlink(missing_ok=True)
            else:
                os.replace(kept, self.directory / name)
        self.held = [] if replaced else self.held


def set_aside(directory) -> SetAside:
    """Move the results in `directory` aside until `settle()`: `--overwrite` of a run whose cells other processes
    write, which must find the directory empty, and must not lose the old results if it saves nothing."""
    return SetAside(directory)


def check_writable(directory) -> Path:
    """Create `directory` if needed and write (then remove) a file there; ValueError, one line, if that fails: an
    output directory is checked before anything is measured."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".loopmark-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = "not a directory" if directory.exists() and not directory.is_dir() else exc.strerror or one_line(exc)
        raise ValueError(f"cannot write to {directory} ({reason})") from None
    return directory


def new_run_dir(root, when: float | None = None) -> Path:
    """A new, empty directory under `root` named by the UTC time (`20261125-194500`; `-2`, `-3`, ... after it when
    that name is taken): each run gets its own and never writes over another's."""
    root = check_writable(root)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    for n in range(1, 10_000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ValueError(f"{root}: no free run directory name for {stamp}")


def latest_run(root) -> Path | None:
    """The run directory `root/latest` points to, if any. A real directory found there (written by a loopmark
    before run directories existed) is first moved to a run directory of its own, named by its time."""
    latest = Path(root) / LATEST
    if latest.is_symlink():
        target = Path(root) / os.readlink(latest)
        return target if target.is_dir() else None
    if latest.is_dir():
        moved = new_run_dir(root, latest.stat().st_mtime)
        try:
            os.replace(latest, moved)  # onto the empty directory just made
        except OSError:
            moved.rmdir()
            return latest
        return moved
    return None


def link_latest(root, run_dir) -> Path | None:
    """Point `root/latest` at `run_dir`, replacing the link in one step (a new link, then a rename); returns the
    link, or None where links cannot be made (the run's own path is then the only name for it)."""
    root, run_dir = Path(root), Path(run_dir)
    latest = root / LATEST
    if latest.is_dir() and not latest.is_symlink():
        latest_run(root)  # an older loopmark's directory: kept, under a name of its own
    if latest.exists() and not latest.is_symlink():  # what could not be moved is not replaced
        return None
    tmp = root / f".{LATEST}.{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.path.relpath(run_dir, root), tmp, target_is_directory=True)
        os.replace(tmp, latest)
    except (OSError, NotImplementedError):
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return latest


def one_line(exc: BaseException) -> str:
    text = str(exc) if str(exc) else type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing field {text}"
    return " ".join(text.split())
