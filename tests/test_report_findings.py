"""The report answers the user's question (issue 13): findings per idiom from the records, sync sites, one per-block
ratio estimator with `compare`, interference flagged instead of a tight interval, memory growth with its error, a
header with the run's settings and load, and committed GPU reference results beside a CPU-only run."""

from __future__ import annotations

import copy
import csv
import functools
import io
import json
import math
import re
import time

import numpy as np
import pytest
from conftest_reports_data import ENVIRONMENT, make_record, write_results_json

import reports.plots
import reports.report
from reports import compare, results, stats
from reports.load import load
from reports.report import write_report

QUIET = {"wall_s": 0.02, "cpu_s": 0.04, "main_cpu_s": 0.0199, "wait_s": 0.0004, "involuntary_switches": 0,
         "others_running": [0, 1], "threads": 2, "cores": 2}
BUSY = {**QUIET, "main_cpu_s": 0.010, "wait_s": 0.021, "others_running": [2, 2]}  # two busy loops beside it


@functools.cache
def _records(device: str = "cpu") -> tuple:
    names = ["baseline", "tensor_sum", "item_list_mean", "graph_sum", "zero_grad_between_backward_and_step",
             "eval_baseline", "eval_graph_sum"]
    return tuple(make_record("mlp", v, device, seed=i) for i, v in enumerate(names))


def _cpu_run(**overrides) -> list[dict]:
    """A CPU-only run of the synthetic variants on mlp, derived as a run writes it; `overrides`: variant -> fields."""
    records = copy.deepcopy(list(_records()))
    for r in records:
        r.update(overrides.get(r["variant"], {}))
    return results.derive(records)


def _report(tmp_path, records, reference_dir=None, figures=None, monkeypatch=None, environment=None) -> str:
    if monkeypatch is not None:
        monkeypatch.setattr(reports.report, "FIGURES", figures or {})  # plots take time; drawn where tested
    path = write_results_json(tmp_path / "run", records, environment)
    write_report([path], reference_dir=reference_dir)
    return (tmp_path / "run" / "report.md").read_text()


# -- one time-ratio estimator -----------------------------------------------------------------------------------

def test_the_report_ratio_is_compares_per_block_estimator():
    base = make_record("mlp", "baseline", "cpu", block_medians_s=None)
    cell = make_record("mlp", "tensor_sum", "cpu")
    base["block_medians_s"] = [1.0, 2.0, 1.0, 4.0]  # a slow machine in rounds 2 and 4 ...
    cell["block_medians_s"] = [0.9, 1.8, 0.8, 3.6]  # ... divides out, block by block
    results.derive([base, cell])
    ratios = [0.9, 0.9, 0.8, 0.9]
    assert cell["ratio_to_baseline"] == pytest.approx(0.9)  # the median of the block ratios
    assert compare._normalised(cell, base).tolist() == pytest.approx(ratios)  # what compare gates on
    assert stats.block_ratios(cell["block_medians_s"], base["block_medians_s"]).tolist() == pytest.approx(ratios)
    logs = np.log(ratios)  # Student's t on the logs, 3 degrees of freedom: t = 3.182
    half = 3.182446 * logs.std(ddof=1) / 2
    assert cell["ratio_ci_low"] == pytest.approx(math.exp(logs.mean() - half), rel=1e-5)
    assert cell["ratio_ci_high"] == pytest.approx(math.exp(logs.mean() + half), rel=1e-5)
    assert base["ratio_to_baseline"] == 1.0 and base["ratio_ci_low"] is None


def test_blocks_of_other_rounds_do_not_pair(tmp_path):
    """A cell kept by --resume beside a re-timed baseline: its blocks were timed in other rounds."""
    base = make_record("mlp", "baseline", "cpu", timing_rounds="run-2")
    cell = make_record("mlp", "tensor_sum", "cpu", timing_rounds="run-1")
    results.derive([base, cell])
    assert cell["ratio_to_baseline"] == pytest.approx(cell["step_time_median_s"] / base["step_time_median_s"])
    assert cell["reliability"].startswith("unreliable: not timed in rounds with baseline")
    cell["timing_rounds"] = "run-2"
    results.derive([base, cell])
    assert cell["reliability"] is None and cell["ratio_to_baseline"] == pytest.approx(
        stats.block_ratio_with_ci(cell["block_medians_s"], base["block_medians_s"])[0])


def test_the_interval_always_holds_the_median_and_blocks_that_do_not_pair_give_none():
    ratio, low, high = stats.block_ratio_with_ci([1.0, 1.0, 1.0, 1.0, 5.0], [1.0] * 5)
    assert ratio == 1.0 and low <= 1.0 <= high
    assert stats.block_ratio_with_ci([1.0, 2.0], [1.0, 2.0, 3.0]) is None  # another count of blocks
    assert stats.block_ratio_with_ci([1.0, 2.0], [1.0, 0.0]) is None
    assert stats.block_ratio_with_ci([2.0], [1.0]) == (2.0, None, None)  # one block: no spread to tell


# -- interference ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("load", "device", "reasons"), [
    (QUIET, "cpu", []),
    (BUSY, "cpu", ["waited for a CPU", "other runnable processes"]),
    ({**QUIET, "others_running": [2, 0]}, "cpu", []),  # seen at one end only: it came and went
    ({**QUIET, "wait_s": None, "main_cpu_s": 0.01}, "cpu", ["main thread off the CPU"]),  # no schedstat: fallback
    ({**QUIET, "wait_s": None, "main_cpu_s": 0.01}, "cuda", []),  # a host waiting for its GPU is no interference
    ({**QUIET, "others_running": [1, 1], "threads": 1}, "cpu", []),  # one core left free for the other process
])
def test_what_counts_as_interference_in_a_block(load, device, reasons):
    assert stats.block_interference(load, device) == reasons


def test_a_disturbed_baseline_block_makes_every_ratio_of_its_group_unreliable(tmp_path, monkeypatch):
    loads = {"baseline": [QUIET, BUSY] + [QUIET] * 6, "tensor_sum": [QUIET] * 8, "graph_sum": [QUIET] * 8,
             "item_list_mean": [QUIET] * 8, "zero_grad_between_backward_and_step": [QUIET] * 8}
    records = _cpu_run(**{v: {"block_load": x} for v, x in loads.items()})
    by = {r["variant"]: r for r in records}
    assert by["baseline"]["reliability"].startswith("unreliable: interference in 1 of 8 of its timed blocks")
    reason = by["tensor_sum"]["reliability"]
    assert reason.startswith("unreliable: interference in 1 of 8 of baseline's timed blocks")
    assert "waited for a CPU for up to 105%" in reason and "2 other runnable process(es) throughout a block" in reason
    assert by["eval_baseline"]["reliability"] is None  # no load readings: not judged
    assert by["tensor_sum"]["cpu_wait_fraction_max"] == pytest.approx(0.02)
    assert by["baseline"]["others_running_max"] == 2

    md = _report(tmp_path, records, monkeypatch=monkeypatch)
    row = next(line for line in md.splitlines() if line.startswith("| tensor_sum |"))
    assert f"{by['tensor_sum']['ratio_to_baseline']:.2f}x, **unreliable** |" in row and "[" not in row.split("|")[3]
    assert "**Timings without an interval**" in md and f"`tensor_sum`: {reason.removeprefix('unreliable: ')}" in md
    assert "load during timing: 1 of 40 timed blocks disturbed" in md
    csv_rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(results.csv_text(records)))}
    assert csv_rows["tensor_sum"]["reliability"] == reason and csv_rows["eval_baseline"]["reliability"] == ""


def test_load_watch_reads_around_a_block_and_the_runner_keeps_one_reading_per_block(tmp_path):
    import torch

    from bench.cell import stage_batches
    from bench.runner import Runner, Settings, cell_spec
    from bench.timing import LoadWatch
    from loops import resolve_variant, resolve_workload

    with LoadWatch() as watch:
        end = time.perf_counter() + 0.02
        while time.perf_counter() < end:
            pass
    f = watch.figures
    assert f["wall_s"] >= 0.02 and 0 < f["main_cpu_s"] <= f["wall_s"] * 1.05
    assert len(f["others_running"]) == 2 and f["threads"] == torch.get_num_threads() and f["cores"] >= 1

    kept = {}

    class Keep(Runner):
        def save(self, spec, m):
            kept[spec.variant] = m

    s = Settings(steps=3, repeats=2, warmup=1, cell_timeout=0)
    workload, device = resolve_workload("loops.example_user:regression"), torch.device("cpu")
    staged = stage_batches(workload, "train", s.steps, device)
    variants = [resolve_variant("baseline"), resolve_variant("tensor_sum")]
    timer = Keep(tmp_path, s, progress=lambda r: None, status=lambda t: None)
    try:
        timer._time(workload, device, variants, staged,
                    {v.name: (cell_spec(workload, v, device, s), results.Measurement()) for v in variants})
    finally:
        timer.close()
    assert [len(m.block_load) for m in kept.values()] == [2, 2] == [len(m.blocks) for m in kept.values()]
    record = results.record(cell_spec(workload, variants[1], device, s), kept["tensor_sum"])
    assert record["block_load"][0]["wall_s"] >= sum(kept["tensor_sum"].blocks[0])  # the block lies within it


# -- memory growth ----------------------------------------------------------------------------------------------

def test_growth_slope_and_its_standard_error_by_hand():
    slope, se, n = stats.growth_per_step([999, 0, 1, 3])  # the first boundary is left out
    assert (slope, n) == (1.5, 3) and se == pytest.approx(math.sqrt(1 / 12))
    assert stats.growth_per_step([178147232] * 16)[:2] == (0.0, 0.0)  # exactly 0, no -1.9e-11 from a solver
    assert math.isnan(stats.growth_per_step([1, 2, 3])[0])


@pytest.mark.parametrize(("trace", "cls"), [
    ([0] + [100_000 + 7168 * i + (-1) ** i * 400 for i in range(15)], "leak"),  # 7 KiB/step: graph_sum
    ([0] + [100_000 + 370 * i + (-1) ** i * 16 for i in range(15)], "grows"),  # a list of losses, until the epoch ends
    ([0] + [100_000 + (-1) ** i * 48 + (i % 3) * 32 for i in range(15)], "none"),  # allocator noise
    ([0] + [100_000 + 2 * i for i in range(15)], "none"),  # significant, but a few bytes a step
    ([0] + [100_000 - 9500 * i for i in range(15)], "none"),  # memory given back
    ([0] + [100_000 + (2000 if i == 14 else 0) for i in range(15)], "none"),  # one jump: the interval includes 0
])
def test_a_leak_is_significant_growth_above_the_threshold(trace, cls):
    slope, se, n = stats.growth_per_step(trace)
    assert stats.growth_class(slope, se, n) == cls


def test_growth_reads_with_its_interval_and_noise_prints_as_zero(tmp_path, monkeypatch):
    noise = [0] + [10_000 + (-1) ** i * 32 for i in range(15)]
    records = _cpu_run(tensor_sum={"memory_growth_bytes_per_step": -1.9e-11, "memory_trace_bytes": [5] * 16},
                       item_list_mean={"memory_growth_bytes_per_step": stats.growth_per_step(noise)[0],
                                       "memory_trace_bytes": noise})
    by = {r["variant"]: r for r in records}
    assert by["tensor_sum"]["memory_growth_class"] == "none" and by["graph_sum"]["memory_growth_class"] == "leak"
    assert by["item_list_mean"]["memory_growth_se_bytes_per_step"] > 0  # from the trace the slope was fitted to
    md = _report(tmp_path, records, monkeypatch=monkeypatch)
    assert "e-11" not in md
    row = next(line for line in md.splitlines() if line.startswith("| tensor_sum |"))
    assert "| 0 B ± 0 B/step: no growth |" in row
    assert "± 95% CI" in md.split("## mlp on cpu")[1].splitlines()[2]  # the growth column says what ± is


def test_the_memory_plot_shows_only_growing_variants_each_in_its_own_colour(tmp_path):
    from reports import plots

    _, df = load(write_results_json(tmp_path, _cpu_run()))
    fig = plots.memory_over_steps(df)
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible()]
    assert [t.split(" on ")[0] for t in titles] == ["graph_sum", "eval_graph_sum"]  # no flat variant
    colours = [ax.get_lines()[1].get_color() for ax in fig.axes if ax.get_visible()]
    assert len(set(colours)) == 2 and plots.COLORS["broken"] not in colours


# -- findings, sync sites, header -------------------------------------------------------------------------------

def test_findings_come_first_and_are_made_from_the_records(tmp_path, monkeypatch):
    details = [{"site": "loops/trackers.py:40", "per_step": 1.0, "count": 200,
                "operations": {"aten::_local_scalar_dense": 200}, "code": "train_loss.append(loss.item())"}]
    records = _cpu_run(graph_sum={"verdict_reason": "REASON-FROM-THE-RECORD"},
                       item_list_mean={"sync_site_details": details},
                       zero_grad_between_backward_and_step={"sync_sites": {"loops/canonical.py:42": 25},
                                                            "sync_kinds": {"Tensor.tolist": 25}})
    md = _report(tmp_path, records, reference_dir=tmp_path / "no-such-dir", monkeypatch=monkeypatch)
    findings, rest = md.split("## Summary")
    assert "## Findings" in findings and "## mlp on cpu" in rest
    loss = findings.split("### Loss tracking")[1].split("###")[0]
    assert "`graph_sum`: REASON-FROM-THE-RECORD" in loss  # the broken one, and why
    assert "**Memory leak**: `graph_sum` (+58.6 KiB/step on mlp/cpu)" in loss
    assert "On this CPU that costs nothing measurable" in loss and "run with `--device cuda`" in loss
    tensor_sum = by_variant(records)["tensor_sum"]
    assert f"Fastest correct on mlp/cpu: `tensor_sum`, {tensor_sum['ratio_to_baseline']:.2f}x" in loss
    # where the syncs are: file:line, how often, the operation, the line's code
    assert "1 per step: `loops/trackers.py:40` `train_loss.append(loss.item())` (scalar read-back)" in loss
    placement = findings.split("### Zero_grad placement")[1].split("###")[0]  # from sync_sites and sync_kinds:
    assert "1 per step: `loops/canonical.py:42` (tolist() read-back)" in placement
    assert "### Evaluation" in findings and "No GPU reference results are committed" in findings
    assert "**What a CPU can and cannot show.**" in findings
    sites = md.split("## Where the syncs are")[1]
    assert "| item_list_mean | `loops/trackers.py:40` | 1 per step | scalar read-back |" in sites
    assert re.search(r"No sync: .*`graph_sum`", sites)


def by_variant(records):
    return {r["variant"]: r for r in records}


def test_the_header_gives_the_settings_the_threads_and_the_load(tmp_path, monkeypatch):
    environment = {**ENVIRONMENT, "settings": {"steps": 25, "repeats": 8, "warmup": 5, "seed": 7}}
    md = _report(tmp_path, _cpu_run(baseline={"block_load": [QUIET] * 8}), monkeypatch=monkeypatch,
                 environment=environment)
    header = md.split("## Findings")[0]
    assert "settings: 25 timed steps × 8 blocks per cell" in header and "5 warm-up steps" in header
    assert "seed 7" in header and "8 torch threads on 16 cores" in header
    assert "load during timing: 0 of 8 timed blocks disturbed" in header
    assert "step time / baseline's (below 1 is faster) [95% CI]" in md.split("## mlp on cpu")[1]
    eval_row = next(line for line in md.splitlines() if line.startswith("| eval_baseline |"))
    assert eval_row.split(" | ")[6] == "n/a"  # param tensors: no optimizer in an evaluation loop


# -- GPU reference results ------------------------------------------------------------------------------------------

def test_committed_gpu_reference_results_stand_beside_a_cpu_run(tmp_path, monkeypatch):
    drawn = []

    def cpu_vs_gpu(df):  # what the figure is drawn from (drawing it takes a second)
        drawn.append(sorted(set(zip(df["device"], df["variant"]))))

    reference = tmp_path / "reference"
    cuda = results.derive(copy.deepcopy(list(_records("cuda"))))
    cuda[1]["ratio_to_baseline"] = None  # replaced by derive on reading: the file's cells are derived again
    write_results_json(reference / "h100", cuda)
    write_results_json(reference / "cpu-quick", _cpu_run())  # a CPU reference: not a GPU one
    monkeypatch.setattr(reports.plots, "cpu_vs_gpu", cpu_vs_gpu)
    md = _report(tmp_path, _cpu_run(), reference_dir=reference, monkeypatch=monkeypatch,
                 figures={"cpu_vs_gpu": ("CPU vs GPU", "cpu_vs_gpu")})
    gpu = ENVIRONMENT["gpu"]["name"]
    assert f"GPU reference results ({gpu}, committed in `" in md and "h100/results.json" in md
    assert "cpu-quick" not in md
    tensor_sum = by_variant(results.read_results(reference / "h100")[1])["tensor_sum"]
    expected = f"mlp/cuda, GPU reference ({gpu}): {tensor_sum['ratio_to_baseline']:.2f}x"
    assert expected in md.split("## Summary")[0]  # in the findings, beside the CPU cost
    section = md.split(f"## GPU reference ({gpu})")[1]
    assert re.search(r"\| tensor_sum \| 0\.8\dx \[", section)  # GPU ratio beside this run's
    assert ("cuda", "tensor_sum") in drawn[0] and ("cpu", "tensor_sum") in drawn[0]  # the CPU run beside the GPU
    # a directory without a GPU reference, or none at all: said, not failed
    for directory in (reference / "cpu-quick", tmp_path / "missing"):
        md = _report(tmp_path, _cpu_run(), reference_dir=directory, monkeypatch=monkeypatch)
        assert "No GPU reference results are committed" in md and "## GPU reference" not in md


def test_new_columns_are_in_the_csv_and_text_columns_stay_text(tmp_path):
    records = _cpu_run(baseline={"block_load": [QUIET] * 8})
    header = results.csv_text(records).splitlines()[0].split(",")
    for column in ("reliability", "memory_growth_se_bytes_per_step", "memory_growth_class", "cpu_wait_fraction_max"):
        assert column in header
    bad = dict(records[0], reliability=1.5)
    with pytest.raises(ValueError, match="reliability is not text"):
        results.check_record(bad, "cell 0")
    doc = json.loads(write_results_json(tmp_path, records).read_text())
    assert doc["cells"][0]["block_load"][0]["others_running"] == [0, 1]
