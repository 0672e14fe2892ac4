"""Synthetic loopmark results for the report and compare tests: records, results.json, pytest-benchmark."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np

from reports import results, stats
from reports.results import FORMAT, FORMAT_VERSION

ENVIRONMENT = {
    "loopmark_version": "0.1.0", "command": "loopmark run --workload mlp --workload cnn",
    "timestamp": "2025-01-01T12:00:00",
    "python": "3.11.7", "torch": "2.5.1", "cuda": "12.4", "cudnn": 90100, "cpu_model": "AMD EPYC 7763",
    "cpu_cores": 16, "torch_threads": 8,
    "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54", "memory_total_bytes": 85_000_000_000},
}

# variant -> (kind, idiom, verdict, expected verdict, relative step time, syncs/step, growth bytes/step)
VARIANTS = {
    "baseline": ("train", "baseline", "identical", "identical", 1.0, 1.0, 0.0),
    "tensor_sum": ("train", "loss tracking", "equivalent", "equivalent", 0.8, 0.0, 0.0),
    "item_list_mean": ("train", "loss tracking", "equivalent", "equivalent", 1.02, 1.0, 8.0),
    "graph_sum": ("train", "loss tracking", "broken", "broken", 1.6, 0.0, 60_000.0),
    "zero_grad_between_backward_and_step": ("train", "zero_grad placement", "broken", "broken", 0.95, 1.0,
                                            0.0),
    "set_to_none_false": ("train", "zeroing style", "different", "identical", 1.05, 1.0, 0.0),
    "eval_baseline": ("eval", "evaluation", "identical", "identical", 0.4, 2.0, 0.0),
    "eval_inference_mode": ("eval", "evaluation", "identical", "identical", 0.38, 2.0, 0.0),
    "eval_graph_sum": ("eval", "evaluation", "broken", "broken", 0.5, 0.0, 200_000.0),
}
BASE_STEP_S = {("mlp", "cpu"): 2e-3, ("mlp", "cuda"): 4e-4, ("cnn", "cpu"): 2e-2, ("cnn", "cuda"): 1.5e-3}


def step_times(median_s: float, n: int = 200, spread: float = 0.03, seed: int = 0) -> list[float]:
    """`n` positive step times around `median_s` (log-normal, relative spread `spread`)."""
    rng = np.random.default_rng(seed)
    return (median_s * np.exp(rng.normal(0.0, spread, n))).tolist()


def make_record(workload: str = "mlp", variant: str = "baseline", device: str = "cpu", *, times=None,
                seed: int = 0, **overrides) -> dict:
    """A finished (status ok) cell record built through the results schema (`reports.results.record`)
    from a spec, synthetic figures and raw step times in 8 timed blocks; `overrides` replace fields after."""
    kind, idiom, verdict, expected, rel, syncs, growth = VARIANTS.get(
        variant, ("train", "user", "identical", None, 1.0, 1.0, 0.0))
    base_s = BASE_STEP_S.get((workload, device), 1e-3)
    times = step_times(base_s * rel, seed=seed) if times is None else list(times)
    blocks = 8 if len(times) % 8 == 0 else 1
    steps = len(times) // blocks
    peak = 40 * 2**20 if device == "cuda" else 120 * 2**20
    spec = results.CellSpec(
        workload=workload, variant=variant, kind=kind, device=device, idiom=idiom,
        description=f"synthetic {variant}",
        device_name=ENVIRONMENT["gpu"]["name"] if device == "cuda" else ENVIRONMENT["cpu_model"],
        torch_version=ENVIRONMENT["torch"], batch_size=64, steps=steps, repeats=blocks, warmup_steps=5,
        expected_verdict=expected)
    figures = {
        "syncs_per_step": syncs, "syncs_per_step_cuda_debug": syncs if device == "cuda" else None,
        "ops_per_step": 120.0, "peak_memory_bytes": peak + (growth * len(times) if growth else 0),
        "memory_growth_bytes_per_step": growth, "tensor_growth_bytes_per_step": growth,
        "rss_growth_bytes_per_step": None, "retains_graph": variant in ("graph_sum", "eval_graph_sum"),
        "reported_loss": 0.51, "exact_loss": 0.5, "loss_rel_error": 0.02, "param_max_rel_diff": 0.0,
        "verdict": verdict, "verdict_reason": f"{verdict}: synthetic reason for {variant}", "param_tensors": 6,
        "memory_trace_bytes": [peak - 2**20 + growth * i for i in range(len(times))],
        "sync_sites": {"loops/canonical.py:42": int(syncs * len(times))} if syncs else {},
    }
    energy = [0.002 * 64 * steps] * blocks if device == "cuda" else []
    m = results.Measurement(figures=figures, blocks=[times[i * steps:(i + 1) * steps] for i in range(blocks)],
                            energy_j=energy)
    record = results.record(spec, m)
    record.update(overrides)
    return refresh_blocks(record)


def null_record(workload: str, variant: str, device: str, status: str, error: str) -> dict:
    """A cell that did not run (skipped/error): identifying fields only, every metric null."""
    kind = VARIANTS.get(variant, ("train",))[0]
    return {"workload": workload, "variant": variant, "device": device, "kind": kind, "status": status,
            "error": error, "verdict": None, "expected_verdict": None, "step_times_s": None,
            "memory_trace_bytes": None, "samples_per_s": None, "ratio_to_baseline": None}


def full_run() -> list[dict]:
    """A fresh copy of `_full_run()` (built once: its raw samples go through the schema's bootstraps)."""
    return copy.deepcopy(_full_run())


@functools.cache
def _full_run() -> list[dict]:
    """2 workloads x (cpu, cuda) x every synthetic variant, plus a skipped cell and an error cell."""
    records = []
    for workload in ("mlp", "cnn"):
        for device in ("cpu", "cuda"):
            for i, variant in enumerate(VARIANTS):
                records.append(make_record(workload, variant, device, seed=i))
    records.append(null_record("cnn", "cuda_graphs", "cpu", "skipped", "needs a CUDA device"))
    records.append(null_record("mlp", "tensor_list_totensor", "cuda", "error",
                               "RuntimeError: CUDA error: an illegal memory access was encountered"))
    return results.derive(records)


def write_results_json(path: Path, records: list[dict], environment: dict | None = None) -> Path:
    """A results.json holding `records` (path: a directory or the file)."""
    path = Path(path)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "results.json"
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "environment": environment or ENVIRONMENT,
           "cells": records}
    path.write_text(json.dumps(doc))
    return path


def pytest_benchmark_doc(records: list[dict], save_data: bool = True) -> dict:
    """What `pytest --benchmark-json` (with --benchmark-save-data) writes for loopmark benchmarks."""
    benchmarks = []
    for r in records:
        times = np.asarray(r["step_times_s"])
        q1, q3 = np.percentile(times, [25, 75])
        stats = {"min": times.min(), "max": times.max(), "mean": times.mean(), "stddev": times.std(ddof=1),
                 "median": float(np.median(times)), "iqr": float(q3 - q1), "q1": float(q1), "q3": float(q3),
                 "rounds": len(times), "iterations": 1, "ops": 1 / times.mean(), "total": times.sum()}
        stats = {k: v if k in ("rounds", "iterations") else float(v) for k, v in stats.items()}
        if save_data:
            stats["data"] = times.tolist()
        info = {k: v for k, v in r.items() if k != "step_times_s"}
        benchmarks.append({
            "group": r["workload"], "name": f"test_cell[{r['workload']}-{r['variant']}-{r['device']}]",
            "fullname": f"tests/bench_cells.py::test_cell[{r['workload']}-{r['variant']}-{r['device']}]",
            "params": {"cell": f"{r['workload']}-{r['variant']}-{r['device']}"}, "param": None,
            "extra_info": {"loopmark": info}, "options": {"timer": "perf_counter"},
            "stats": stats,
        })
    return {
        "machine_info": {"node": "ci", "machine": "x86_64", "python_version": "3.11.7", "system": "Linux",
                         "release": "6.1.0", "cpu": {"brand_raw": "AMD EPYC 7763", "count": 16}},
        "commit_info": {"id": "abc123", "branch": "main", "dirty": False},
        "benchmarks": benchmarks, "datetime": "2025-01-01T12:00:00+00:00", "version": "5.1.0",
    }


def refresh_blocks(record: dict) -> dict:
    """Make `steps`, `block_medians_s` and the step-time statistics agree with `step_times_s` (8 blocks where
    they divide evenly, else one), as a real run writes them."""
    times = record.get("step_times_s")
    if times:
        blocks = 8 if len(times) % 8 == 0 else 1
        steps = len(times) // blocks
        record["steps"] = steps
        record["block_medians_s"] = [float(np.median(times[i * steps:(i + 1) * steps])) for i in range(blocks)]
        record.update(stats.summarize(times))
        record["samples_per_s"] = record["batch_size"] / record["step_time_median_s"]
    return record
