"""The regression gate end to end: loopmark run twice, loopmark compare, exit codes."""

import sys

import pytest

from bench.cli import main

LOOP = '''
import torch


def loop(run):
    run.model.train()
    running, batches = torch.zeros((), device=run.device), 0
    for data, labels in run.batches:
        data, labels = data.to(run.device), labels.to(run.device)
        run.optimizer.zero_grad()
        loss = run.criterion(run.model(data), labels)
        loss.backward()
        run.optimizer.step()
        running += loss.detach()
        {extra}
        batches += 1
    return (running / batches).item()
'''


STEPS = 3  # the smallest `loopmark run --steps`; the tracked loop reads back once an epoch, so 1/3 sync a step


def _run(root, name: str, extra: str):
    """`loopmark run --no-report` of the loop above (with `extra` as one more line per step) as `userloop:loop`, into
    a directory that holds a report of other results (which must go: the gate reads results.json alone)."""
    src = root / name
    src.mkdir()
    (src / "userloop.py").write_text(LOOP.format(extra=extra))
    out = root / f"out_{name}"
    out.mkdir()
    for stale in ("report.md", "report.html", "plot_throughput.png"):
        (out / stale).write_text("a report of other results")
    argv = ["run", "--device", "cpu", "--quick", "--workload", "digits", "--variant", "userloop:loop", "--steps",
            str(STEPS), "--repeats", "1", "--warmup", "1", "--out", str(out), "--no-report"]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(src))
        mp.delitem(sys.modules, "userloop", raising=False)
        assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of the same cells: the loop, the same loop again, the loop with one more `.item()` per step."""
    root = tmp_path_factory.mktemp("gate")
    return {"base": _run(root, "a", "pass"), "same": _run(root, "b", "pass"),
            "item": _run(root, "c", "loss.item()  # a debugging print left in")}


def test_one_more_item_per_step_fails_the_gate_on_syncs(runs, capsys):
    """One more `.item()` per step in the candidate makes `loopmark compare` exit 1, naming the cell and its syncs."""
    capsys.readouterr()
    assert main(["compare", str(runs["base"]), str(runs["item"]), "--only-deterministic"]) == 1
    out = capsys.readouterr().out
    assert "digits/userloop:loop/cpu" in out
    assert f"syncs/step changed: {1 / STEPS:g} -> {1 + 1 / STEPS:g}" in out


def test_same_code_compares_clean_on_deterministic_metrics(runs, capsys):
    """Two runs of the same code compare clean (exit 0) on the deterministic metrics."""
    assert main(["compare", str(runs["base"]), str(runs["same"]), "--only-deterministic"]) == 0


def test_no_report_writes_the_results_alone(runs):
    """`run --no-report` writes results.csv and results.json, no report, and removes the report that was there."""
    assert sorted(p.name for p in runs["base"].iterdir()) == ["results.csv", "results.json"]


@pytest.mark.parametrize("args", [["/nonexistent/dir", "/nonexistent/dir"]])
def test_unusable_input_is_exit_2(capsys, args):
    """A baseline or candidate that is not a results file is one line on stderr and exit 2."""
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
