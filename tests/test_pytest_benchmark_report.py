"""`loopmark report` reads a pytest-benchmark JSON written by a real pytest session that benchmarks a loopmark cell."""

import json
from pathlib import Path

import reports.report  # noqa: F401
from bench import runner  # noqa: F401
from bench.cli import main

# The inner session runs in this process (no second torch import) and unloads, when it ends, every module it
# imported first; a C extension cannot be loaded twice, so what it and the report need is imported here, before.

TESTS = Path(__file__).resolve().parent

# benchmarks one cell with tests/test_benchmarks.py's own code: the cheapest cell, two rounds of its smoke block
ONE_CELL = f"""
import dataclasses
import sys

sys.path.insert(0, {str(TESTS)!r})
from test_benchmarks import SMOKE, benchmark_cell


def test_mlp_baseline(benchmark):
    benchmark_cell(benchmark, "mlp", "baseline", dataclasses.replace(SMOKE, repeats=2))
"""


def test_report_from_a_real_pytest_benchmark_json(measured_once, pytester, tmp_path, monkeypatch):
    """A `pytest --benchmark-json` file of one loopmark cell becomes a report (exit 0) whose report.md shows the
    cell with its metrics and pytest-benchmark's timing."""
    pytester.makepyfile(test_one_cell=ONE_CELL)
    json_path = tmp_path / "bench.json"
    # no xdist inside, should the outer session run under it: pytest-benchmark times nothing under xdist
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:xdist", "--benchmark-json", str(json_path))
    result.assert_outcomes(passed=1)
    (bench,) = json.loads(json_path.read_text())["benchmarks"]
    assert bench["stats"]["rounds"] == 2
    cell = bench["extra_info"]["loopmark"]
    assert (cell["workload"], cell["variant"], cell["device"], cell["verdict"]) == ("mlp", "baseline", "cpu",
                                                                                    "identical")

    out = tmp_path / "report"
    assert main(["report", str(json_path), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "(pytest-benchmark)" in report and "## mlp on cpu" in report
    table = report.split("## mlp on cpu", 1)[1].split("\n## ", 1)[0]  # the cell's table ("Where the syncs are" too
    (row,) = [line for line in table.splitlines()  # has a baseline row), named by its test
              if line.startswith("| baseline (`test_one_cell.py::test_mlp_baseline`) |")]
    assert "identical" in row
