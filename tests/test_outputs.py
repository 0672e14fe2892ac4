"""Nothing lost (issue 12, items 6-8): where results and reports are written, the results.json/results.csv pair
staying one pair, and an output that cannot be written.

The `loopmark run` tests measure nothing: `Runner.run_group` is replaced by one that saves a synthetic cell per
variant through the runner's own `save`, so what is under test (the output directory, the writes) is the real code.
"""

import csv
import errno
import json
import os
import signal
import threading

import pytest
from conftest_reports_data import make_record, pytest_benchmark_doc

import reports.report
from bench import runner
from bench.cli import main
from reports import results
from reports.results import CellSpec, Measurement

RUN = ["run", "--device", "cpu", "--workload", "mlp"]
TIMES = [0.010, 0.012, 0.011]


@pytest.fixture
def groups_run(monkeypatch):
    """`loopmark run` without measuring: each group's cells are saved at once; returns the groups run."""
    calls = []

    def run_group(self, g, *args, **kwargs):
        calls.append(g)
        for variant in g.variants:
            spec = CellSpec(workload=g.workload, variant=variant, kind="train", device=g.device, batch_size=8,
                            steps=len(TIMES), repeats=1)
            self.save(spec, Measurement(blocks=[list(TIMES)]))

    monkeypatch.setattr(runner.Runner, "run_group", run_group)
    monkeypatch.setattr(reports.report, "FIGURES", {})  # the report is written, without plots (time)
    return calls


def _variants(directory) -> set[str]:
    return {c["variant"] for c in json.loads((directory / "results.json").read_text())["cells"]}


def _csv_variants(directory) -> list[str]:
    with open(directory / "results.csv", newline="") as f:
        return [row["variant"] for row in csv.DictReader(f)]


def _files(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_error_line(stderr: str, needle: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if needle in line]
    return line


# -- 6. a run never destroys an earlier run's results unless asked to ------------------------------------------

def test_each_run_without_out_gets_its_own_directory_and_latest_points_at_the_newest(groups_run, tmp_path,
                                                                                      monkeypatch, capsys):
    """Two runs without --out: two directories, each with its own cells; results/latest is the second; --resume
    without --out goes on in the run results/latest points at."""
    monkeypatch.chdir(tmp_path)
    assert main([*RUN, "--variant", "tensor_sum"]) == 0
    assert main([*RUN, "--variant", "graph_sum"]) == 0
    root = tmp_path / "results"
    runs = sorted(p for p in root.iterdir() if p.name != "latest")
    assert len(runs) == 2 and all(p.is_dir() and not p.is_symlink() for p in runs)
    latest = root / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[1].resolve()
    assert _variants(runs[0]) == {"baseline", "tensor_sum"}
    assert _variants(runs[1]) == {"baseline", "graph_sum"}
    assert f"results go to {runs[1].relative_to(tmp_path)}/" in capsys.readouterr().err

    assert main([*RUN, "--variant", "graph_sum", "--resume"]) == 0
    assert sorted(p for p in root.iterdir() if p.name != "latest") == runs  # no third directory
    assert len(groups_run) == 2  # every cell of the resumed run was finished


def test_a_latest_directory_of_an_older_loopmark_is_kept(groups_run, tmp_path, monkeypatch):
    """results/latest as a real directory (before run directories existed) is moved aside whole, not written over."""
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "results" / "latest"
    results.write_results(old, {}, [make_record("mlp", "item_list_mean", times=TIMES)])
    before = _files(old)
    assert main([*RUN, "--variant", "tensor_sum"]) == 0
    latest = tmp_path / "results" / "latest"
    assert latest.is_symlink() and _variants(latest) == {"baseline", "tensor_sum"}
    (kept,) = [p for p in (tmp_path / "results").iterdir() if p.name != "latest" and p.resolve() != latest.resolve()]
    assert _files(kept) == before


def test_an_out_holding_results_is_refused_unless_overwrite(groups_run, tmp_path, capsys):
    """--out naming an earlier run's directory: one line, exit 2, nothing measured, the files as they were;
    --overwrite replaces them."""
    out = tmp_path / "r"
    results.write_results(out, {}, [make_record("mlp", "item_list_mean", times=TIMES)])
    before = _files(out)
    assert main([*RUN, "--variant", "tensor_sum", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "--overwrite")
    assert line.startswith("loopmark run: ") and str(out) in line
    assert groups_run == [] and _files(out) == before

    assert main([*RUN, "--variant", "tensor_sum", "--out", str(out), "--overwrite"]) == 0
    assert _variants(out) == {"baseline", "tensor_sum"}


def test_report_of_a_json_file_goes_to_a_directory_beside_it_not_loose_into_the_current_one(tmp_path,
                                                                                            monkeypatch, capsys):
    """`loopmark report out.json` in the directory holding out.json writes out-report/ and nothing else there."""
    monkeypatch.setattr(reports.report, "FIGURES", {})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.json").write_text(json.dumps(pytest_benchmark_doc([make_record("mlp", "baseline", times=TIMES)])))
    assert main(["report", "out.json"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-report", "out.json"]
    assert {"report.md", "report.html", "results.csv"} <= {p.name for p in (tmp_path / "out-report").iterdir()}
    assert "out-report/report.md" in capsys.readouterr().out  # where it went is printed


@pytest.mark.parametrize("elsewhere", [True, False], ids=["out-elsewhere", "default-out"])
def test_report_of_a_benchmark_json_in_a_run_directory_leaves_the_run_untouched(tmp_path, monkeypatch, elsewhere):
    """A pytest-benchmark JSON kept in a run's directory: its report (and its results.csv) go to --out, or to a
    directory of its own; the run's results.csv and results.json stay as they were."""
    monkeypatch.setattr(reports.report, "FIGURES", {})
    run = tmp_path / "run"
    results.write_results(run, {}, [make_record("mlp", "graph_sum", times=TIMES)])
    (run / "bench.json").write_text(json.dumps(pytest_benchmark_doc([make_record("mlp", "tensor_sum", times=TIMES)])))
    before = _files(run)
    out = tmp_path / "elsewhere" if elsewhere else run / "bench-report"
    assert main(["report", str(run / "bench.json"), *(["--out", str(out)] if elsewhere else [])]) == 0
    assert {p: b for p, b in _files(run).items() if p.parts[0] != "bench-report"} == before
    assert _csv_variants(out) == ["tensor_sum"] and (out / "report.md").exists()


# -- 7. results.json and results.csv stay one pair --------------------------------------------------------------

def _fail_after(monkeypatch, writes: int, error=lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
    """Every file write of the results writer (one fsync each) after the first `writes` raises `error()`."""
    done, fsync = [], os.fsync

    def failing(fd):
        if len(done) >= writes:
            raise error()
        done.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


@pytest.mark.parametrize("reader", ["read_results", "load", "report", "compare", "merge", "run --resume"])
def test_a_results_csv_left_behind_between_the_two_writes_is_rewritten_by_resume_alone(groups_run, tmp_path,
                                                                                       monkeypatch, capsys, reader):
    """results.json written, results.csv not (the process stopped between them): `run --resume`, which owns the
    directory, brings results.csv back in line with results.json; a reader of it (report, compare, merge) writes
    nothing there."""
    from reports.load import load

    run = tmp_path / "r"
    first = [make_record("mlp", "baseline", times=TIMES)]
    results.write_results(run, {}, first)
    with monkeypatch.context() as m:
        _fail_after(m, 1)
        with pytest.raises(OSError):
            results.write_results(run, {}, [*first, make_record("mlp", "tensor_sum", times=TIMES)])
    assert _csv_variants(run) == ["baseline"]  # the pair disagrees on disk
    stale = (run / "results.csv").read_bytes()
    {"read_results": lambda: results.read_results(run), "load": lambda: load(run),
     "report": lambda: main(["report", str(run), "--out", str(tmp_path / "report")]),
     "compare": lambda: main(["compare", str(run), str(run)]),
     "merge": lambda: main(["merge", str(run), "--out", str(tmp_path / "merged"), "--partial"]),
     "run --resume": lambda: main([*RUN, "--variant", "tensor_sum", "--out", str(run), "--resume"])}[reader]()
    if reader != "run --resume":
        assert (run / "results.csv").read_bytes() == stale
        return
    cells = json.loads((run / "results.json").read_text())["cells"]
    assert _csv_variants(run) == ["baseline", "tensor_sum"]
    assert (run / "results.csv").read_text() == results.csv_text(cells)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread")
def test_ctrl_c_between_the_two_writes_waits_until_both_are_written(tmp_path, monkeypatch):
    """A SIGINT while results.csv is being written interrupts once both files are written, never between them."""
    first = [make_record("mlp", "baseline", times=TIMES)]
    results.write_results(tmp_path, {}, first)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        calls, fsync = [], os.fsync

        def interrupting(fd):  # the second write is results.csv's
            calls.append(fd)
            fsync(fd)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(os, "fsync", interrupting)
        with pytest.raises(KeyboardInterrupt):
            results.write_results(tmp_path, {}, [*first, make_record("mlp", "tensor_sum", times=TIMES)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _variants(tmp_path) == {"baseline", "tensor_sum"}
    assert _csv_variants(tmp_path) == ["baseline", "tensor_sum"]  # read straight from disk, nothing repaired


# -- 8. an output that cannot be written ------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under-a-file", "read-only"])
def test_an_unwritable_out_is_refused_before_anything_is_measured(groups_run, tmp_path, capsys, where):
    """--out that is a regular file, below one, or a read-only directory: one line, exit 2, nothing measured."""
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes to a read-only directory")
    (tmp_path / "file").write_text("not a directory")
    out = {"file": tmp_path / "file", "under-a-file": tmp_path / "file" / "r",
           "read-only": tmp_path / "ro" / "r"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
    assert main([*RUN, "--variant", "tensor_sum", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "cannot write")
    assert line.startswith("loopmark run: ") and str(out) in line
    assert groups_run == []

    assert main(["report", str(tmp_path / "nowhere.json"), "--out", str(out)]) == 2  # bad input first: one line
    capsys.readouterr()
    good = tmp_path / "good"
    results.write_results(good, {}, [make_record("mlp", "baseline", times=TIMES)])
    assert main(["report", str(good), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "cannot write")


@pytest.mark.parametrize("writes", [2, 3], ids=["json-fails", "csv-fails"])
def test_a_full_disk_mid_run_keeps_the_saved_cells(groups_run, tmp_path, monkeypatch, capsys, writes):
    """The disk fills after the first cell (`writes` files written): one line, exit 3, no traceback; results.json
    keeps every cell saved before, and results.csv agrees with it once mended (as `run --resume` reads it)."""
    out = tmp_path / "r"
    _fail_after(monkeypatch, writes)
    assert main([*RUN, "--variant", "tensor_sum", "--variant", "graph_sum", "--out", str(out)]) == 3
    line = _one_error_line(capsys.readouterr().err, "No space left on device")
    assert line.startswith("loopmark run: cannot write ") and str(out) in line
    saved = {2: {"baseline"}, 3: {"baseline", "tensor_sum"}}[writes]
    monkeypatch.undo()
    assert _variants(out) == saved
    results.read_results(out, mend=True)
    assert set(_csv_variants(out)) == saved


def test_results_set_aside_come_back_unless_replaced(tmp_path):
    """`run --nproc-per-node N --overwrite` sets the old results aside: they come back if the run saved nothing, and
    are dropped once a new results.json exists."""
    from reports.results import set_aside

    (tmp_path / "results.json").write_text("old")
    (tmp_path / "results.csv").write_text("old")
    set_aside(tmp_path).settle()  # nothing saved: the old results are back
    assert (tmp_path / "results.json").read_text() == "old" and (tmp_path / "results.csv").read_text() == "old"
    aside = set_aside(tmp_path)
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "results.json").write_text("new")
    aside.settle()
    assert (tmp_path / "results.json").read_text() == "new" and not (tmp_path / "results.csv").exists()
    assert not list(tmp_path.glob(".*overwritten"))


def _fail_reports(monkeypatch):
    """Every write of a report file (report.md, report.html, plot_*.png) fails as on a full disk; results do not."""
    fsync = os.fsync

    def failing(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith((".report.", ".plot_")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


def _traced(monkeypatch):
    """`loopmark trace` without tracing: the script is measured as one synthetic trace cell (the trace itself is
    tests/test_trace.py's)."""
    from types import SimpleNamespace

    from bench import trace

    def fake(target, steps, warmup, **kwargs):
        outcome = SimpleNamespace(exception=None, exit_status=0)
        return SimpleNamespace(record=make_record("train.py", "trace", times=TIMES), outcome=outcome, exit_code=0)

    monkeypatch.setattr(trace, "trace", fake)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds a written file's name in /proc")
@pytest.mark.parametrize("command", ["run", "trace"])
def test_a_report_that_cannot_be_written_is_exit_3_and_the_results_are_kept(groups_run, tmp_path, monkeypatch,
                                                                            capsys, command):
    """The README's exit 3 for a report that cannot be written (a full disk), in `run` and in `trace`: one line that
    says so and how to make it again; the results are whole."""
    out = tmp_path / "r"
    _fail_reports(monkeypatch)
    if command == "run":
        argv = [*RUN, "--variant", "tensor_sum", "--out", str(out)]
    else:
        (tmp_path / "train.py").write_text("print('not run')\n")
        _traced(monkeypatch)
        argv = ["trace", "--steps", "2", "--warmup", "1", "--out", str(out), str(tmp_path / "train.py")]
    assert main(argv) == 3
    line = _one_error_line(capsys.readouterr().err, "report not written")
    assert "No space left on device" in line and f"loopmark report {out}" in line
    assert results.read_results(out)[1] and not (out / "report.md").exists()
