"""The pytest plugin (bench/pytest_plugin.py) in a user's project, run through pytest itself (`pytester`).

The project is two files: `userloops.py` (a workload and three loops) and a conftest-free `test_user.py` that uses the
`loopmark` fixture, its assertion helpers and the `loopmark` marker. It runs once with pytest-benchmark timing
(`--benchmark-json`, read back by `loopmark report` and `loopmark compare`) and once without (`-p no:benchmark`).
Each inner session runs in this process: torch is imported once, and what the plugin imports lazily is imported here
first, by `measured_once` (tests/conftest.py) for a measurement (an in-process session unloads, when it ends, the
modules it imported).
"""

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import bench.pytest_plugin
import reports.compare
import reports.load
import reports.report
from bench.cli import main
from reports.results import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]

USERLOOPS = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

import loops


def workload():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = (x.sum(dim=1) > 0).long()
    return loops.Workload(name="tiny", build_model=lambda: nn.Linear(4, 2),
                          build_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                          criterion=nn.CrossEntropyLoss(), train_data=TensorDataset(x, y),
                          test_data=TensorDataset(x, y), batch_size=16, drop_last=True)


def device_loss(run):
    running, n = torch.zeros((), device=run.device), 0
    for data, labels in run.batches:
        run.optimizer.zero_grad()
        loss = run.criterion(run.model(data), labels)
        loss.backward()
        run.optimizer.step()
        running += loss.detach()
        n += 1
    return running / n


def item_every_step(run):
    total, n = 0.0, 0
    for data, labels in run.batches:
        run.optimizer.zero_grad()
        loss = run.criterion(run.model(data), labels)
        loss.backward()
        run.optimizer.step()
        total += loss.item()
        n += 1
    return total / n


def no_zero_grad(run):
    total, n = 0.0, 0
    for data, labels in run.batches:
        loss = run.criterion(run.model(data), labels)
        loss.backward()
        run.optimizer.step()
        total += loss.detach()
        n += 1
    return float(total / n)
'''

TEST_USER = '''
import pytest

import userloops

SMALL = dict(repeats=2, warmup=1, memory_steps=4, check_steps=2)


def test_device_loss(loopmark):
    result = loopmark.measure(workload=userloops.workload, variant=userloops.device_loss, **SMALL)
    loopmark.assert_no_new_syncs(result, max_per_step=0)  # the loss is returned as a tensor: read after the loop
    loopmark.assert_correct(result, verdict="equivalent")  # met by identical too
    assert result.steps == 3 and result.repeats == 2 and result.syncs_per_step == 0
    assert result.verdict_reason and result.status == "ok" and result.workload == "tiny"
    assert result.variant == "userloops:device_loss" and result.device == "cpu"
    assert result.step_time_median_s > 0 and result.ops_per_step > 0 and result.peak_memory_bytes > 0
    assert len(result.step_times_s) == 6 and result.block_medians_s is None  # no baseline interleaved: no block ratio
    assert {name: getattr(result, name) for name in result.record} == result.record


def test_item_every_step_syncs(loopmark):
    result = loopmark.measure(workload=userloops.workload, variant=userloops.item_every_step, steps=3, **SMALL)
    loopmark.assert_no_new_syncs(result, max_per_step=0)


@pytest.mark.loopmark(max_syncs_per_step=1, verdict="identical")
def test_marker_met(loopmark):
    loopmark.measure(workload=userloops.workload, variant="baseline", steps=3, **SMALL)  # the built-in seed loop


@pytest.mark.loopmark(verdict="equivalent")
def test_marker_broken(loopmark):
    loopmark.measure(workload=userloops.workload, variant=userloops.no_zero_grad, steps=3, **SMALL)
'''


def _plugin_args() -> list[str]:
    """The plugin comes from the package's `pytest11` entry point; a checkout installed before it existed gets it
    by name (both at once would register it twice)."""
    installed = any(ep.name == "loopmark" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "bench.pytest_plugin"]


@pytest.fixture
def project(measured_once, pytester, monkeypatch):
    pytester.makepyfile(userloops=USERLOOPS, test_user=TEST_USER)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # pytest-benchmark times nothing under xdist
    monkeypatch.setattr(reports.report, "FIGURES", {})  # the report is written without plots (time)
    return pytester


def _check_outcomes(result, project, out: Path) -> dict:
    """What both runs show: two tests pass, two fail with messages naming the sync site and the broken verdict;
    --loopmark-out holds the session's four cells, with ratios to the baseline one of them measured."""
    result.assert_outcomes(passed=2, failed=2)
    source = (project.path / "userloops.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if "total += loss.item()" in text)
    result.stdout.fnmatch_lines([
        "*AssertionError: userloops:item_every_step on tiny (cpu): 1 host-device syncs per step, more than the 0 "
        "allowed. Where (syncs per step):",
        f"*  userloops.py:{line}  1  total += loss.item()",
        "*by operator: aten::_local_scalar_dense x3 over 3 steps",
    ])
    result.stdout.fnmatch_lines(["*@pytest.mark.loopmark: userloops:no_zero_grad on tiny (cpu): verdict broken, "
                                 "expected equivalent: step 2 consumed the sum of 2 batch gradients"])
    doc = json.loads((out / "results.json").read_text())
    cells = {c["variant"]: c for c in doc["cells"]}
    assert set(cells) == {"userloops:device_loss", "userloops:item_every_step", "baseline", "userloops:no_zero_grad"}
    assert cells["userloops:device_loss"]["ratio_to_baseline"] > 0 and cells["baseline"]["ratio_to_baseline"] == 1
    assert doc["environment"]["command"].startswith("pytest ")
    assert (out / "results.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    return cells


def test_a_user_project_benchmarks_its_loop_with_pytest_benchmark_and_loopmark_reports_the_json(project, tmp_path):
    """`pytest --benchmark-json` on a test that uses the fixture: pytest-benchmark times `repeats` rounds of one
    block each, every loopmark metric rides in extra_info, and `loopmark report` / `loopmark compare` read it."""
    json_path, out = tmp_path / "out.json", tmp_path / "lm"
    result = project.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", *_plugin_args(),
                                         "--loopmark-steps", "3", "--benchmark-json", str(json_path),
                                         "--loopmark-out", str(out))
    cells = _check_outcomes(result, project, out)
    doc = json.loads(json_path.read_text())
    benches = {b["name"]: b for b in doc["benchmarks"]}
    assert set(benches) == {"test_device_loss", "test_item_every_step_syncs", "test_marker_met",
                            "test_marker_broken"}
    for entry in benches.values():
        assert entry["stats"]["rounds"] == 2 and entry["group"] == "loopmark tiny cpu"
        info = entry["extra_info"]["loopmark"]
        assert info["steps_per_round"] == 3 and len(info["step_times_s"]) == 6 and info["block_medians_s"] is None
        # the load of each round, read as `loopmark run` reads it; the test that measured the cell
        assert len(info["block_load"]) == 2 and all(b["wall_s"] > 0 for b in info["block_load"])
        assert info["test_id"] == f"test_user.py::{entry['name']}"
    info = benches["test_device_loss"]["extra_info"]["loopmark"]
    assert info["verdict"] == cells["userloops:device_loss"]["verdict"] and info["syncs_per_step"] == 0
    assert info["sync_sites"] == cells["userloops:device_loss"]["sync_sites"]
    assert doc["machine_info"]["loopmark"]["torch"] and "timestamp" not in doc["machine_info"]["loopmark"]

    assert main(["report", str(json_path), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "(pytest-benchmark)" in report and "## tiny on cpu" in report
    table = report.split("## tiny on cpu", 1)[1].split("\n## ", 1)[0]  # the cells' table, not later ones
    rows = {line.split(" | ")[0].partition(" (")[0].strip("|* "): line for line in table.splitlines()
            if line.startswith("| ")}
    assert "| userloops:device_loss (`test_user.py::test_device_loss`) |" in rows["userloops:device_loss"]
    assert re.search(r"load during timing: \d of 8 timed blocks disturbed", report)
    assert all(c["reliability"] == "ok" or c["reliability"].startswith("unreliable: ") for c in cells.values())
    assert cells["userloops:device_loss"]["verdict"] in rows["userloops:device_loss"]
    assert "broken" in rows["userloops:no_zero_grad"] and "identical" in rows["baseline"]
    assert main(["compare", str(json_path), str(json_path)]) == 0  # time: not gated, see alone_record


def test_without_pytest_benchmark_the_fixture_times_with_loopmarks_own_timing(project, tmp_path):
    """`-p no:benchmark`: the same tests, timed by `loopmark run`'s timing pass; --loopmark-steps sets the steps of
    the tests that give none."""
    out = tmp_path / "lm"
    result = project.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark",
                                         *_plugin_args(), "--loopmark-steps", "3", "--loopmark-out", str(out))
    cells = _check_outcomes(result, project, out)
    assert not [line for line in result.outlines if line.startswith(("benchmark", "Name (time in"))]
    for cell in cells.values():
        assert cell["steps"] == 3 and len(cell["step_times_s"]) == 6 and cell["warmup_time_s"] > 0


def test_the_plugin_is_installed_with_the_package_and_imports_no_torch():
    """`pytest --help` and sessions that do not use the fixture stay fast: torch is imported when a test measures."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["pytest11"] == {"loopmark": "bench.pytest_plugin"}
    code = "import sys, bench.pytest_plugin; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert bench.pytest_plugin.Loopmark.measure.__doc__
