"""Reports: loading results (loopmark or pytest-benchmark JSON), the figures, report.md/.html, results.csv."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest_reports_data import full_run, make_record, null_record, pytest_benchmark_doc, write_results_json
from matplotlib.figure import Figure

from reports import plots
from reports.load import load, to_frame
from reports.report import FIGURES, write_report
from reports.results import CSV_COLUMNS
from reports.stats import block_ratio_with_ci

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _small_run() -> list[dict]:
    variants = ("baseline", "tensor_sum", "graph_sum")
    return [make_record("mlp", v, d) for d in ("cpu", "cuda") for v in variants]


def test_report_from_results_json(tmp_path):
    results = write_results_json(tmp_path / "run", full_run())
    written = write_report([results])

    out = results.parent
    assert {p.name for p in written} >= {"report.md", "report.html"}
    pngs = sorted(out.glob("plot_*.png"))
    assert {p.name for p in pngs} == {f"plot_{name}.png" for name in FIGURES}
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)

    md = (out / "report.md").read_text()
    assert "torch 2.5.1" in md and "NVIDIA H100 80GB HBM3" in md
    summary = md.split("## mlp on cpu")[0]
    assert "**Broken** variants" in summary
    assert "**graph_sum** (mlp/cpu, mlp/cuda, cnn/cpu, cnn/cuda)" in summary
    assert "set_to_none_false on mlp/cpu: different, expected identical" in summary
    assert "cuda_graphs on cnn/cpu: skipped: needs a CUDA device" in summary
    assert "tensor_list_totensor on mlp/cuda: error: RuntimeError: CUDA error" in summary
    for heading in ["## mlp on cpu", "## mlp on cuda", "## cnn on cpu", "## cnn on cuda"]:
        assert heading in md
    graph_sum_row = next(line for line in md.splitlines() if line.startswith("| **graph_sum** |"))
    # an exactly linear synthetic trace: no error, growth above the threshold
    assert "| **broken** |" in graph_sum_row and "+58.6 KiB ± 0 B/step: **leak**" in graph_sum_row
    tensor_sum_row = next(line for line in md.splitlines() if line.startswith("| tensor_sum |"))
    ratio, low, high = block_ratio_with_ci(*(next(r["block_medians_s"] for r in full_run() if r["variant"] == v
                                                  and r["workload"] == "mlp" and r["device"] == "cpu")
                                             for v in ("tensor_sum", "baseline")))
    assert f"| {ratio:.2f}x [{low:.2f}, {high:.2f}] |" in tensor_sum_row and f"{ratio:.2f}" == "0.80"
    assert "MISMATCH" in next(line for line in md.splitlines() if line.startswith("| set_to_none_false |"))
    assert "| cuda_graphs | – | – | – | – | – | – | skipped | needs a CUDA device |" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)  # nulls are shown as –, never as nan

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "<link" not in html and "<script" not in html
    assert '<tr class="broken">' in html and "<strong>broken</strong>" in html


def test_report_into_another_directory(tmp_path):
    results = write_results_json(tmp_path / "run", _small_run())
    written = write_report([results.parent], out_dir=tmp_path / "out")
    assert all(p.parent == tmp_path / "out" for p in written)
    assert not (results.parent / "report.md").exists()


def test_report_with_one_device_and_null_metrics(tmp_path):
    records = [r for r in _small_run() if r["device"] == "cpu"]
    records.append(null_record("mlp", "broken_user_loop", "cpu", "error", "ValueError: bad"))
    results = write_results_json(tmp_path, records)
    write_report([results])
    assert not (tmp_path / "plot_cpu_vs_gpu.png").exists()
    assert (tmp_path / "plot_throughput.png").exists()
    assert "broken_user_loop on mlp/cpu: error: ValueError: bad" in (tmp_path / "report.md").read_text()


def test_report_when_nothing_ran(tmp_path):
    records = [null_record("mlp", "baseline", "cpu", "skipped", "no time"),
               null_record("mlp", "tensor_sum", "cpu", "skipped", "no time")]
    results = write_results_json(tmp_path, records)
    write_report([results])
    assert list(tmp_path.glob("plot_*.png")) == []
    assert "2 cells: 0 finished ok, 2 not." in (tmp_path / "report.md").read_text()


def test_report_concatenates_a_cpu_run_and_a_gpu_run(tmp_path):
    records = _small_run()
    cpu = write_results_json(tmp_path / "cpu", [r for r in records if r["device"] == "cpu"])
    gpu = write_results_json(tmp_path / "gpu", [r for r in records if r["device"] == "cuda"])
    write_report([cpu, gpu])
    md = (tmp_path / "cpu" / "report.md").read_text()
    assert "## mlp on cpu" in md and "## mlp on cuda" in md
    assert md.count("results: `") == 2
    assert (tmp_path / "cpu" / "plot_cpu_vs_gpu.png").exists()


def test_pytest_benchmark_json_gets_a_results_csv(tmp_path):
    records = _small_run()
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(pytest_benchmark_doc(records)))
    written = write_report([path])

    out = tmp_path / "bench-report"  # a directory of its own beside the JSON, never the JSON's (often the current one)
    assert out / "results.csv" in written and out / "report.md" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-report", "bench.json"]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CSV_COLUMNS
    assert len(rows) == 1 + len(records)
    first = dict(zip(rows[0], rows[1]))
    assert first["variant"] == "baseline" and first["batch_size"] == "64"
    assert first["energy_j_per_sample"] == ""  # null
    assert (out / "report.html").exists()


def test_pytest_benchmark_timing_fields(tmp_path):
    times = [0.010, 0.012, 0.011, 0.013, 0.009]
    base = make_record("mlp", "baseline", "cpu", times=times)
    slow = make_record("mlp", "tensor_sum", "cpu", times=[2 * t for t in times])
    evals = [make_record("mlp", "eval_baseline", "cpu", times=times),
             make_record("mlp", "eval_inference_mode", "cpu", times=[0.5 * t for t in times])]
    for record in (base, slow, *evals):  # each test timed on its own, as the pytest plugin's records are
        record["block_medians_s"] = None
    doc = pytest_benchmark_doc([base, slow, *evals])
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    env, df = load(path)

    assert env["source_format"] == "pytest-benchmark" and env["cpu_model"] == "AMD EPYC 7763"
    assert env["torch"] == "2.5.1" and env["commit"] == "abc123"
    row = df.iloc[0]
    assert row["step_time_median_s"] == pytest.approx(0.011)
    assert row["samples_per_s"] == pytest.approx(64 / 0.011)
    assert row["step_times_s"] == times
    assert row["step_time_ci_low_s"] <= 0.011 <= row["step_time_ci_high_s"]
    # train against baseline, eval against eval_baseline
    assert df["ratio_to_baseline"].tolist() == pytest.approx([1.0, 2.0, 1.0, 0.5])
    # resampled medians lie within [min, max] of each sample, so the CI of the ratio lies within these
    low, high = df.loc[1, "ratio_ci_low"], df.loc[1, "ratio_ci_high"]
    assert 2 * 0.009 / 0.013 <= low <= 2.0 <= high <= 2 * 0.013 / 0.009
    assert np.isnan(df.loc[0, "ratio_ci_low"])  # the baseline itself: ratio 1 by definition
    # no blocks timed in rounds with the baseline: an interval over single steps, and said to be unreliable
    assert df.loc[1, "reliability"].startswith("unreliable: not timed in rounds with baseline")


def test_pytest_benchmark_steps_per_round_and_no_saved_data(tmp_path):
    record = make_record("mlp", "baseline", "cpu", times=[0.04, 0.04, 0.05], steps_per_round=4)
    doc = pytest_benchmark_doc([record], save_data=False)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    _, df = load(path)
    row = df.iloc[0]
    assert row["step_time_median_s"] == pytest.approx(0.01)  # a round of 0.04 s is 4 steps
    assert row["samples_per_s"] == pytest.approx(6400)
    assert row["step_times_s"] is None and np.isnan(row["step_time_ci_low_s"])


def test_pytest_benchmark_without_loopmark_cells_is_unusable(tmp_path):
    doc = pytest_benchmark_doc([make_record()])
    del doc["benchmarks"][0]["extra_info"]["loopmark"]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="without any loopmark benchmark"):
        load(path)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("[1, 2", "not readable JSON"),
    ('{"format": "something-else"}', "not a loopmark results file nor a pytest-benchmark JSON"),
    ('{"format": "loopmark-results", "version": 99, "cells": []}', "version 99 is not supported"),
])
def test_unusable_input_raises_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as info:
        write_report([path])
    assert str(path) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_draws(name):
    fig = getattr(plots, FIGURES[name][1])(to_frame(full_run()))
    assert isinstance(fig, Figure)
    fig.canvas.draw()  # layout and text are resolved: no exception
    width, height = fig.get_size_inches()
    assert width >= 10 and height >= 3


def test_figure_height_grows_with_the_variants():
    few = plots.throughput(to_frame([make_record("mlp", v) for v in ["baseline", "tensor_sum"]]))
    many = plots.throughput(to_frame([make_record("mlp", f"user_variant_{i}") for i in range(30)]))
    assert many.get_size_inches()[1] > 2 * few.get_size_inches()[1]


def test_figures_without_data_are_none():
    df = to_frame([make_record("mlp", "baseline", memory_growth_bytes_per_step=0.0)])
    assert plots.memory_over_steps(df) is None
    assert plots.cpu_vs_gpu(df) is None


def test_broken_variants_stand_out():
    fig = plots.ratio_to_baseline(to_frame(full_run()))
    ax = fig.axes[0]
    labels = {t.get_text(): t for t in ax.get_yticklabels()}
    assert labels["graph_sum"].get_color() == plots.COLORS["broken"]
    assert labels["tensor_sum"].get_color() != plots.COLORS["broken"]
    assert any(text.get_text() == "verdict: BROKEN" for text in fig.legends[0].get_texts())


def test_cuda_groups_show_the_ratio_to_the_cuda_graph_floor(tmp_path):
    from conftest_reports_data import BASE_STEP_S, step_times

    from reports.results import write_results

    floor = make_record("mlp", "cuda_graph_step", "cuda", times=step_times(BASE_STEP_S[("mlp", "cuda")] / 4))
    write_results(tmp_path / "run", {}, [*_small_run(), floor])
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").read_text().splitlines()))
    ratios = {(r["device"], r["variant"]): r["ratio_to_floor"] for r in rows}
    assert float(ratios["cuda", "baseline"]) == pytest.approx(4.0)  # same noise draws: the medians are 4x apart
    assert float(ratios["cuda", "cuda_graph_step"]) == 1.0
    assert ratios["cpu", "baseline"] == ""  # no floor on CPU

    _, df = load(tmp_path / "run")
    assert df.loc[df["device"] == "cuda", "ratio_to_floor"].notna().all()
    write_report([tmp_path / "run"])
    md = (tmp_path / "run" / "report.md").read_text()
    cpu_part, cuda_part = md.split("## mlp on cuda")
    assert "ratio to floor" not in cpu_part
    assert "| ratio to floor (cuda_graph_step) |" in cuda_part
    assert "| 4.00x |" in next(line for line in cuda_part.splitlines() if line.startswith("| baseline |"))
    assert "| 1 (floor) |" in next(line for line in cuda_part.splitlines() if line.startswith("| cuda_graph_step |"))
