"""Faults in a user's code stay in their cells, a cell that hangs is stopped, a run says where it is, and an
interrupted group resumes without repeating its untimed passes (issue 12, items 10-13, 18 and 19).

The user's code is a small module written into a temporary directory: a workload of a 4 -> 2 Linear layer over 12
samples (3 batches), and workloads and loops that fail in each way a user's can.
"""

import json
import re
import sys
import threading
import time

import pytest
import torch

from bench import runner
from bench.cell import stage_batches
from bench.cli import main
from reports.results import read_results

USER = "cell_faults_user"
USER_CODE = '''
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

import loops
from bench.timing import StepClock

INTERRUPT = {"armed": True}


def _data(n):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x.sum(1) > 0).long())


def _workload(name, **changes):
    fields = dict(name=name, build_model=lambda: nn.Linear(4, 2), build_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                  criterion=nn.CrossEntropyLoss(), train_data=_data(12), test_data=_data(8), batch_size=4)
    return loops.Workload(**{**fields, **changes})


def tiny():
    return _workload("tiny")


def raises():
    raise RuntimeError("no workload today")


def no_test():
    return _workload("no_test", test_data=None)


def _no_model():
    raise RuntimeError("cannot build this model")


def bad_model():
    return _workload("bad_model", build_model=_no_model)


def too_small():
    return _workload("too_small", train_data=_data(3), drop_last=True)


def explode(run):
    raise RuntimeError("boom " + "x" * 400)


def sleeps(run):
    time.sleep(60)


CALLS = {"sleeps_in_correctness": 0}


def sleeps_in_correctness(run):
    CALLS["sleeps_in_correctness"] += 1  # the sync pass calls it twice (warm-up, its epoch), then correctness
    if CALLS["sleeps_in_correctness"] > 2:
        time.sleep(60)
    return loops.train_epoch(run)


def sleeps_when_timed(run):
    if isinstance(run.batches, StepClock):
        time.sleep(60)
    return loops.train_epoch(run)


def interrupt_when_timed(run):
    if isinstance(run.batches, StepClock) and INTERRUPT["armed"]:
        INTERRUPT["armed"] = False
        raise KeyboardInterrupt
    return loops.train_epoch(run)
'''
# the smallest cell: 3 timed steps, 2 blocks, 1 warm-up step, a correctness pass of 2 epochs of 2 steps
TINY = {"steps": 3, "repeats": 2, "warmup": 1, "check_epochs": 2, "check_steps": 2, "memory_steps": 4}
SMALLEST = ["--device", "cpu", "--quick", "--steps", "3", "--repeats", "2", "--warmup", "1"]


def _import_user(root, mp) -> None:
    (root / f"{USER}.py").write_text(USER_CODE)
    mp.syspath_prepend(str(root))
    mp.delitem(sys.modules, USER, raising=False)


@pytest.fixture
def user(tmp_path, monkeypatch):
    _import_user(tmp_path, monkeypatch)
    return tmp_path


def _by_cell(records) -> dict:
    return {(r["workload"], r["variant"]): r for r in records}


def test_faulty_workloads_are_error_cells_and_a_failed_cell_shows_its_message(user, capsys, monkeypatch):
    """Items 10 and 13, one `loopmark run --strict` over a good workload and two that fail (the workload function
    raises, build_model raises), with a built-in loop and one of the user's that raises.

    10: the faulty workloads' cells end as `error` with their message; the other cells run and the report is
    written (a panel without any step time once failed the whole report). 13: a failed cell shows its message (one
    line, truncated) in its progress line and in the summary, and --strict exits 1 listing the failing cells."""
    from reports import report

    # the figure that failed on a panel without step times; the others take seconds and are tested elsewhere
    monkeypatch.setattr(report, "FIGURES", {k: v for k, v in report.FIGURES.items() if k == "step_time_distributions"})
    out = user / "r"
    code = main(["run", *SMALLEST, "--workload", f"{USER}:tiny", "--workload", f"{USER}:raises", "--workload",
                 f"{USER}:bad_model", "--variant", "baseline", "--variant", f"{USER}:explode", "--strict",
                 "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stderr and "report not written" not in stderr, stderr
    cells = _by_cell(read_results(out)[1])
    assert cells[("tiny", "baseline")]["status"] == "ok" and len(cells[("tiny", "baseline")]["step_times_s"]) == 6
    for variant in ("baseline", f"{USER}:explode"):  # stored under the name it was asked by
        assert cells[(f"{USER}:raises", variant)]["status"] == "error"
        assert cells[(f"{USER}:raises", variant)]["error"] == "RuntimeError: no workload today"
        assert cells[("bad_model", variant)]["status"] == "error"
        assert cells[("bad_model", variant)]["error"] == "RuntimeError: cannot build this model"
    assert "bad_model" in (out / "report.md").read_text()
    assert (out / "plot_step_time_distributions.png").exists()

    assert code == 1  # --strict
    message = runner.short("RuntimeError: boom " + "x" * 400)
    assert len(message) == 100 and message.endswith("…")
    [line] = [x for x in stderr.splitlines() if x.startswith("cpu  tiny") and f"{USER}:explode" in x]
    assert line.split()[3] == "error" and line.endswith(f"  {message}")
    assert f"  cpu tiny {USER}:explode: error: {message}" in stdout.splitlines()
    assert f"  cpu tiny {USER}:explode: error: {message}" in stderr.split("--strict")[-1].splitlines()


def test_an_evaluation_variant_on_a_workload_without_test_data_is_an_error_cell(user, tmp_path):
    """Item 10: an evaluation variant on a workload without test data is an `error` cell; its training cells run."""
    run = runner.Runner(tmp_path / "r", runner.Settings(**TINY), progress=lambda record: None)
    cells = _by_cell(run.run(runner.plan(["cpu"], [f"{USER}:no_test"], ["baseline", "eval_baseline"])))
    assert cells[("no_test", "baseline")]["status"] == "ok"
    assert cells[("no_test", "eval_baseline")]["status"] == "error"
    assert cells[("no_test", "eval_baseline")]["error"] == "ValueError: workload 'no_test' has no test data"


def test_check_with_a_workload_that_raises_is_an_error_row(user, capsys):
    """Item 10, `loopmark check`: a workload function that raises fails its rows with the message, no traceback."""
    assert main(["check", "--workload", f"{USER}:raises", "--variant", "baseline"]) == 1
    captured = capsys.readouterr()
    assert "RuntimeError: no workload today" in captured.out and "Traceback" not in captured.err


def test_a_dataset_smaller_than_one_batch_is_a_clear_error(user, tmp_path):
    """Item 11: a dataset smaller than one batch (drop_last=True) is an error naming the sizes, not an endless loop
    over an empty loader; run in a thread so that the old endless loop cannot hang the test session."""
    from loops import resolve_workload

    outcome = {}

    def attempt():
        try:
            stage_batches(resolve_workload(f"{USER}:too_small"), "train", 3, torch.device("cpu"))
        except ValueError as exc:
            outcome["staging"] = str(exc)
        run = runner.Runner(tmp_path / "r", runner.Settings(**TINY), progress=lambda record: None)
        outcome["cells"] = run.run(runner.plan(["cpu"], [f"{USER}:too_small"], ["baseline"]))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "staging the batches of a too small dataset never ends"
    assert outcome["staging"] == ("workload 'too_small' has no train batch: 3 sample(s), batch_size 4, "
                                  "drop_last=True (a dataset smaller than one batch with drop_last=True, or an "
                                  "empty one)")
    [cell] = outcome["cells"]
    assert cell["status"] == "error" and cell["error"] == f"ValueError: {outcome['staging']}"


def test_a_cell_past_its_time_limit_is_timeout_and_the_run_goes_on(user, tmp_path):
    """Item 12: a loop that hangs in its untimed passes, and one that hangs only when timed, end as `timeout`
    after --cell-timeout seconds; the baseline is measured; compare counts ok -> timeout as a regression."""
    from reports.compare import compare
    from reports.load import to_frame

    def run(variants, **settings):
        return runner.Runner(tmp_path / f"r{len(variants)}", runner.Settings(**TINY, **settings),
                             progress=lambda record: None, status=lambda text: None
                             ).run(runner.plan(["cpu"], [f"{USER}:tiny"], variants))

    run(["baseline"], cell_timeout=0)  # no limit: first-use imports and allocations are not the limited run's
    start = time.monotonic()
    records = run(["baseline", f"{USER}:sleeps", f"{USER}:sleeps_when_timed", f"{USER}:sleeps_in_correctness"],
                  cell_timeout=1.0)
    assert time.monotonic() - start < 30  # each loop would sleep 60 s
    cells = {r["variant"]: r for r in records}
    assert cells["baseline"]["status"] == "ok" and len(cells["baseline"]["step_times_s"]) == 3 * 2
    for variant in (f"{USER}:sleeps", f"{USER}:sleeps_when_timed"):
        assert cells[variant]["status"] == "timeout"
        assert cells[variant]["error"] == "the cell ran past its time limit of 1 s (--cell-timeout)"
    assert cells[f"{USER}:sleeps_when_timed"]["verdict"] == "identical"  # its untimed passes ended in time
    stopped = cells[f"{USER}:sleeps_in_correctness"]  # the sync pass ended before the limit: its figures are kept
    assert stopped["status"] == "timeout" and stopped["syncs_per_step"] is not None and stopped.get("verdict") is None
    before = [{**r, "status": "ok", "error": None} for r in records]
    result = compare({}, to_frame(before), {}, to_frame(records))
    assert {c.key[1]: c.regressions for c in result.regressions} == {
        v: ["status ok -> timeout: the cell ran past its time limit of 1 s (--cell-timeout)"]
        for v in (f"{USER}:sleeps", f"{USER}:sleeps_when_timed", f"{USER}:sleeps_in_correctness")}


def test_a_cell_budget_spans_its_passes_and_stops_a_python_loop():
    """Item 12: a cell's time limit is spent over all its stretches of work; a busy Python loop is stopped."""
    budget = runner.Budget(0.4)
    with budget():
        time.sleep(0.25)
    start = time.monotonic()
    with pytest.raises(runner.CellTimeout), budget():
        while True:
            pass
    assert 0.1 <= time.monotonic() - start < 2  # the 0.15 s left, not a fresh 0.4 s
    with pytest.raises(runner.CellTimeout), budget():  # nothing left: stopped before it starts
        pass


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_cell_timeout_must_be_a_number_of_seconds(capsys, value):
    """Item 12: a bad --cell-timeout is one line and exit 2."""
    assert main(["run", "--cell-timeout", value]) == 2
    err = capsys.readouterr().err
    assert "argument --cell-timeout" in err and err.count("\n") == 1


def test_strict_fails_on_faults_and_unexpected_verdicts_only():
    """Item 13: what `run --strict` counts: faults, a built-in's verdict other than declared, a user's broken loop."""
    from bench.cli import strict_failures

    def cell(variant, status="ok", **fields):
        return {"device": "cpu", "workload": "mlp", "variant": variant, "status": status, "error": None, **fields}

    fine = [cell("baseline", verdict="identical", verdict_as_expected=True),
            cell("pkg.m:loop", verdict="different", verdict_as_expected=None),
            cell("fp16_grad_scaler", "skipped", error="needs a CUDA GPU", verdict_as_expected=None)]
    assert strict_failures(fine) == []
    bad = [cell("a", "timeout", error="the cell ran past its time limit of 1 s (--cell-timeout)"),
           cell("b", "diverged", error="non-finite loss in block 1"), cell("c", "oom"),
           cell("tensor_sum", verdict="broken", expected_verdict="equivalent", verdict_as_expected=False),
           cell("pkg.m:broken", verdict="broken", verdict_as_expected=None)]
    assert strict_failures(bad) == [
        "cpu mlp a: timeout: the cell ran past its time limit of 1 s (--cell-timeout)",
        "cpu mlp b: diverged: non-finite loss in block 1", "cpu mlp c: oom",
        "cpu mlp tensor_sum: verdict broken, expected equivalent", "cpu mlp pkg.m:broken: verdict broken"]


def test_progress_names_each_pass_and_timed_block_never_inside_one(user, tmp_path, monkeypatch, capsys):
    """Item 18: without a terminal, a plain line on stderr per pass of each cell and per round of timed blocks (never
    said inside a timed block), and once a group has been timed, an estimate of the time left."""
    from bench.cli import _Progress

    timing = {"inside": False}
    inside = []

    def timed(cell, batches):
        timing["inside"] = True
        try:
            return time_block(cell, batches)
        finally:
            timing["inside"] = False

    time_block = runner.time_block
    monkeypatch.setattr(runner, "time_block", timed)
    groups = runner.plan(["cpu"], [f"{USER}:tiny"], ["baseline", "tensor_sum", "eval_baseline"])
    printer = _Progress(groups)

    def status(text):
        inside.append(timing["inside"])
        printer.status(text)

    runner.Runner(tmp_path / "r", runner.Settings(**TINY), progress=printer, status=status).run(groups)
    printer.close()
    lines = capsys.readouterr().err.splitlines()
    assert inside and not any(inside)
    train = lines[:lines.index("tiny cpu: timing block 2/2") + 1]
    assert train == ["tiny cpu: syncs 1/2 (baseline)", "tiny cpu: correctness 1/2 (baseline)",
                     "tiny cpu: memory 1/2 (baseline)", "tiny cpu: syncs 2/2 (tensor_sum)",
                     "tiny cpu: correctness 2/2 (tensor_sum)", "tiny cpu: memory 2/2 (tensor_sum)",
                     "tiny cpu: warm-up of 2 cell(s) before timing", "tiny cpu: timing block 1/2",
                     "tiny cpu: timing block 2/2"]
    assert [x.split()[1] for x in lines[len(train):len(train) + 2]] == ["tiny", "tiny"]  # the two cells, finished
    evaluation = [x for x in lines[len(train) + 2:] if x.startswith("tiny cpu: ")]
    assert [x.split(" (about ")[0] for x in evaluation] == [
        "tiny cpu: syncs 1/1 (eval_baseline)", "tiny cpu: correctness 1/1 (eval_baseline)",
        "tiny cpu: memory 1/1 (eval_baseline)", "tiny cpu: warm-up of 1 cell(s) before timing",
        "tiny cpu: timing block 1/2", "tiny cpu: timing block 2/2"]
    assert all(re.search(r" \(about \d+ s left\)$", x) for x in evaluation), evaluation


def test_resume_after_an_interrupt_keeps_the_untimed_passes(user, tmp_path, monkeypatch):
    """Item 19: Ctrl-C during a group's timing keeps each cell's untimed-pass figures (untimed.json, beside a
    results.json that never holds unfinished cells); --resume times the group without running those passes again,
    and only under the same settings."""
    out = tmp_path / "r"
    groups = runner.plan(["cpu"], [f"{USER}:tiny"], ["baseline", "tensor_sum", f"{USER}:interrupt_when_timed"])
    with pytest.raises(KeyboardInterrupt):
        runner.Runner(out, runner.Settings(**TINY), progress=lambda record: None).run(groups)
    kept = {tuple(c["cell"]): c["figures"] for c in json.loads((out / runner.UNTIMED_FILE).read_text())["cells"]}
    assert set(kept) == {("tiny", v, "cpu") for v in ("baseline", "tensor_sum", f"{USER}:interrupt_when_timed")}
    assert not (out / "results.json").exists() or read_results(out)[1] == []
    other = runner.UntimedStore(out, runner.Settings(**{**TINY, "steps": 4}), resume=True)
    assert other.get(("tiny", "baseline", "cpu")) is None  # figures of other settings are not this run's

    passes = []
    untimed_passes = runner.untimed_passes
    monkeypatch.setattr(runner, "untimed_passes", lambda *args, **kw: passes.append(args[1].name)
                        or untimed_passes(*args, **kw))
    records = runner.Runner(out, runner.Settings(**TINY), resume=True, progress=lambda record: None).run(groups)
    assert passes == []
    cells = {r["variant"]: r for r in records}
    assert all(r["status"] == "ok" and len(r["step_times_s"]) == 3 * 2 for r in records)
    for (_, variant, _), figures in kept.items():
        for field in ("verdict", "syncs_per_step", "ops_per_step", "peak_memory_bytes"):
            assert cells[variant][field] == figures[field]
    assert not (out / runner.UNTIMED_FILE).exists()  # emptied when its group is timed
