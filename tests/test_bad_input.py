"""Bad input and interrupts, as a user meets them (issue 12): one line, no traceback, exit 2 for unusable input and
130 for Ctrl-C. Items 3-5 (`--resume` under other settings, on an unusable file, two runs into one --out), 16 (deeply
nested JSON, `$` in names, a FIFO or /dev/zero as input) and 17 (Ctrl-C during imports, nothing written).

Runs measure nothing: `Runner.run_group` is replaced by one that saves a synthetic cell per variant.
"""

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from io import BytesIO
from pathlib import Path

import pytest
from conftest_reports_data import make_record, null_record, pytest_benchmark_doc, write_results_json
from matplotlib import cbook
from matplotlib.text import Text

import reports.report
from bench import runner
from bench.cli import main
from reports import plots, results
from reports.load import to_frame
from reports.results import CellSpec, Measurement

RUN = ["run", "--device", "cpu", "--workload", "mlp", "--variant", "baseline"]
DEEP = "[" * 200_000


def _one_line(err: str, needle: str) -> None:
    assert "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and needle in err, err


@pytest.fixture
def fake_cells(monkeypatch):
    """`loopmark run` without measuring: each group's cells are saved at once, under the run's settings. A test may
    set `during[0]` to a function called once, while the first group runs (before its cells are saved)."""
    during = []

    def run_group(self, g, workload):
        while during:
            during.pop()()
        for variant in g.variants:
            spec = CellSpec(workload=workload.name, variant=variant, kind="train", device=g.device, batch_size=8,
                            steps=self.s.steps, repeats=self.s.repeats, warmup_steps=self.s.warmup)
            self.save(spec, Measurement(blocks=[[0.010, 0.012, 0.011]]))

    monkeypatch.setattr(runner.Runner, "run_group", run_group)
    monkeypatch.setattr(reports.report, "FIGURES", {})  # the report is written, without plots (time)
    return during


@pytest.mark.parametrize("command", ["compare", "report", "merge"])
def test_a_directory_without_results_is_named_not_a_results_directory(tmp_path, capsys, command):
    """`loopmark compare bench reports`: a directory that holds no results is called that, not a missing
    `bench/results.json`, a file the user never named."""
    a, b = tmp_path / "bench", tmp_path / "reports"
    a.mkdir()
    b.mkdir()
    argv = {"compare": ["compare", str(a), str(b)], "report": ["report", str(a)],
            "merge": ["merge", str(a), str(b), "--out", str(tmp_path / "m")]}[command]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, f"{a}: not a results directory (it holds no results.json)")


# -- item 16: deeply nested JSON, a FIFO or a device as input, `$` in names --------------------------------------

def _results_dir(tmp_path: Path, content: str) -> Path:
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text(content)
    return out


@pytest.mark.parametrize("command", ["report", "compare baseline", "compare candidate", "run --resume"])
def test_deeply_nested_json_is_one_line_and_exit_2(tmp_path, capsys, command):
    """Item 16: `[` x 200000 (json's parser recurses per level) is unusable input: exit 2 and one line, not a
    RecursionError traceback with exit 1 (which for `compare` means "regression")."""
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    good = write_results_json(tmp_path / "good", [make_record()])
    argv = {"report": ["report", str(deep)], "compare baseline": ["compare", str(deep), str(good)],
            "compare candidate": ["compare", str(good), str(deep)],
            "run --resume": [*RUN, "--out", str(_results_dir(tmp_path, DEEP)), "--resume"]}[command]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, "not readable JSON (nested too deeply)")


@contextlib.contextmanager
def _memory_capped(extra_bytes: int = 2**30):
    """This process's address space capped at its size now + `extra_bytes` while the block runs: code that reads
    /dev/zero whole gets a MemoryError instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    cap = size + extra_bytes if hard == resource.RLIM_INFINITY else min(size + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _main_in_thread(argv: list[str], fifo: Path):
    """main(argv) in a thread: its exit status, or None if it is still running after 15 s (waiting on the FIFO for a
    writer: the FIFO is then opened for writing and closed, so that the thread ends)."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(rc=main(argv)), daemon=True)
    thread.start()
    thread.join(timeout=15)
    if thread.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=15)
        return None
    return outcome.get("rc")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs FIFOs, /dev/zero")
@pytest.mark.parametrize("command", ["report fifo", "compare fifo", "run --resume fifo", "report /dev/zero",
                                     "compare /dev/zero", "run --resume /dev/zero"])
def test_a_fifo_or_a_device_as_input_is_refused_without_reading_it(tmp_path, capsys, command):
    """Item 16: a FIFO (reading it waits for a writer forever) or /dev/zero (endless) as an input file is one line
    and exit 2, at once: no hang, no memory taken."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    bad = fifo if "fifo" in command else Path("/dev/zero")
    good = write_results_json(tmp_path / "good", [make_record()])
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").symlink_to(bad)
    argv = {"report": ["report", str(bad)], "compare": ["compare", str(good), str(bad)],
            "run": [*RUN, "--out", str(out), "--resume"]}[command.split()[0]]
    with _memory_capped():
        rc = _main_in_thread(argv, fifo)
    assert rc == 2, f"exit status {rc} (None: still waiting after 15 s)"
    _one_line(capsys.readouterr().err, "not a regular file")


def test_a_file_over_the_size_limit_is_refused(tmp_path, capsys, monkeypatch):
    """Item 16: an input file larger than `results.MAX_INPUT_BYTES` is refused with one line before it is read."""
    path = write_results_json(tmp_path / "r", [make_record()])
    monkeypatch.setattr(results, "MAX_INPUT_BYTES", path.stat().st_size - 1)
    assert main(["report", str(path)]) == 2
    _one_line(capsys.readouterr().err, f"{path.stat().st_size:,} bytes, more than the")
    assert main(["compare", str(path), str(path)]) == 2
    _one_line(capsys.readouterr().err, "more than the")


def test_names_with_dollar_signs_are_drawn_literally():
    """Item 16: `$...$` in a workload, variant or device name is not matplotlib mathtext: the figure is drawn (an
    invalid TeX command no longer fails it) and every text shows the name as written."""
    workload, broken, plain = "w$x$", r"$\nosuchcommand$", "a$b$c"
    records = [make_record(workload, "baseline", "cpu"),
               make_record(workload, broken, "cpu", verdict="broken", memory_growth_bytes_per_step=4096.0,
                           memory_trace_bytes=[float(i * 4096) for i in range(8)]),
               null_record(workload, plain, "cpu", "error", "RuntimeError: $oops$"),
               make_record(workload, "baseline", "cuda", device_name="GPU $1$"),
               make_record(workload, broken, "cuda"), make_record(workload, plain, "cuda")]
    df = to_frame(results.derive(records))
    shown = []
    for figure in (plots.throughput, plots.memory_over_steps, plots.cpu_vs_gpu):
        fig = figure(df)
        fig.savefig(BytesIO(), format="png", dpi=20)
        texts = [t.get_text() for t in fig.findobj(Text) if t.get_text()]
        assert not [t for t in texts if cbook.is_math_text(t)], figure.__name__
        shown += [t.replace(r"\$", "$") for t in texts]
    for name in (workload, broken, plain, f"{workload} on cuda (GPU $1$)", broken + " (BROKEN)",
                 "error: not measured"):
        assert any(name in t for t in shown), name


# -- items 3, 4, 5: what --resume finishes, and one run at a time per directory -----------------------------------

@pytest.mark.parametrize("option,first,second", [("--steps", "3", "4"), ("--repeats", "1", "2"),
                                                 ("--seed", "0", "1")])
def test_resume_under_other_settings_is_refused(fake_cells, tmp_path, capsys, option, first, second):
    """Item 3: `--resume` under other --steps, --repeats or --seed than the stored run is refused with one line
    naming the setting, the file unchanged; under the same settings it finishes the run."""
    out = tmp_path / "r"
    argv = [*RUN, "--out", str(out), "--quick", option, first]
    assert main(argv) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main([*argv[:-1], second, "--variant", "tensor_sum", "--resume"]) == 2
    _one_line(capsys.readouterr().err, f"was measured with {option[2:]} {first}, this run would use "
                                       f"{option[2:]} {second}")
    assert (out / "results.json").read_bytes() == before
    assert main([*argv, "--variant", "tensor_sum", "--resume"]) == 0
    assert {c["variant"] for c in json.loads((out / "results.json").read_text())["cells"]} == {"baseline",
                                                                                                "tensor_sum"}


def test_resume_of_a_file_without_stored_settings_checks_its_cells(fake_cells, tmp_path, capsys):
    """Item 3: a results.json written before the settings were stored is checked on its cells' steps."""
    record = make_record()
    record.update(steps=16, repeats=3, warmup_steps=2)  # as --quick
    out = write_results_json(tmp_path / "r", [record]).parent
    assert main([*RUN, "--out", str(out), "--quick", "--steps", "4", "--resume"]) == 2
    _one_line(capsys.readouterr().err, "was measured with steps 16, this run would use steps 4")


@pytest.mark.parametrize("content,needle", [
    ('{"format": "loopmark-results", "version": 1, "cells": [{"workl', "not readable JSON"),
    (json.dumps(pytest_benchmark_doc([make_record()])), "not a loopmark results file"),
    ('{"format": "loopmark-results", "version": 1, "cells": [{"workload": "mlp", "device": "cpu"}]}',
     "cell 0 has no variant"),
    ('{"format": "loopmark-results", "version": 1, "cells": [{"workload": ["mlp"], "variant": "baseline", '
     '"device": "cpu"}]}', "cell 0: workload is not text"),
    ('{"format": "loopmark-results", "version": 1, "cells": [{"workload": "mlp", "variant": "baseline", '
     '"device": "cpu", "status": "ok", "verdict": [[["identical"]]]}]}', "cell 0: verdict is not text"),
], ids=["truncated", "pytest-benchmark", "no-variant", "workload-not-text", "verdict-not-text"])
def test_resume_on_an_unusable_results_file_is_one_line_and_exit_2(tmp_path, capsys, content, needle):
    """Item 4: `--resume` on a truncated results.json, a pytest-benchmark file or a record without a variant: one
    line, exit 2, the file left as it was."""
    out = _results_dir(tmp_path, content)
    assert main([*RUN, "--out", str(out), "--resume"]) == 2
    _one_line(capsys.readouterr().err, needle)
    assert (out / "results.json").read_text() == content


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(fake_cells, tmp_path, capsys, resume):
    """Item 5: while a run writes to --out, a second `loopmark run` into it (both starting on an empty directory,
    or the second with --resume) is refused with one line, and the first keeps all its cells; once the first has
    ended, the directory is free again."""
    out = tmp_path / "r"
    argv = [*RUN, "--out", str(out)]
    second = []
    fake_cells.append(lambda: second.append(main([*argv[:-4], "--variant", "tensor_sum", "--out", str(out)]
                                                 + (["--resume"] if resume else []))))
    assert main(argv) == 0
    assert second == [2]
    err = capsys.readouterr().err
    _one_line("".join(line for line in err.splitlines(keepends=True) if "another loopmark run" in line),
              f"{out}: another loopmark run is writing its results there")
    assert {c["variant"] for c in json.loads((out / "results.json").read_text())["cells"]} == {"baseline"}
    assert main([*argv[:-4], "--variant", "tensor_sum", "--out", str(out), "--resume"]) == 0


# -- item 17: Ctrl-C -----------------------------------------------------------------------------------------------

SWALLOWING_IMPORT = """
import signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, whatever this test runs under


class SwallowingImport:
    '''Stands for a part of torch's import that swallows a KeyboardInterrupt (numpy's initialisation, inside it,
    can): it says that torch is importing, waits for the Ctrl-C, and goes on as if none had come.'''

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not getattr(self, "done", False):
            self.done = True
            print("importing torch", file=sys.stderr, flush=True)
            try:
                time.sleep(120)
            except KeyboardInterrupt:
                pass
        return None


sys.meta_path.insert(0, SwallowingImport())
from bench.cli import main

sys.exit(main())
"""


def test_ctrl_c_while_torch_imports_is_one_line_and_exit_130(tmp_path):
    """Item 17: Ctrl-C while torch is still importing ends the command at once with one line and exit 130, even where
    the import swallows the KeyboardInterrupt (the command then went on, or failed later with a traceback). The
    signal is sent once the process says it is inside the import."""
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWING_IMPORT, "list"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert proc.stderr.readline() == "importing torch\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, err, out) == (130, "interrupted\n", "")


def test_an_interrupt_before_any_cell_finished_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    """Item 17: Ctrl-C before the first cell finished: one line saying nothing was written (not "0 finished cell(s)
    kept in results.csv", a file that does not exist), exit 130."""
    def interrupted(self, g, workload):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "run_group", interrupted)
    out = tmp_path / "r"
    assert main([*RUN, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    _one_line(err, f"interrupted: no cell had finished, so nothing was written to {out}/results.csv")
    assert "kept" not in err and not (out / "results.json").exists() and not (out / "results.csv").exists()


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("ops_per_step", 10**400, "cell 1: ops_per_step is beyond the range of a float (1000000000000"),
    ("syncs_per_step", "1.0", "cell 1: syncs_per_step is not a number ('1.0')"),
    ("peak_memory_bytes", True, "cell 1: peak_memory_bytes is not a number (True)"),
    ("step_times_s", [0.1, "fast", 0.1], "cell 1: step_times_s[1] is not a number ('fast')"),
    ("sync_sites", {"a.py:3": "many"}, "cell 1: sync_sites['a.py:3'] is not a number ('many')"),
])
@pytest.mark.parametrize("command", ["report", "compare baseline", "compare candidate", "merge"])
def test_a_number_that_is_not_one_is_one_line_and_exit_2(tmp_path, capsys, command, field, value, needle):
    """An integer beyond a float's range, or text, where a results file must hold a number: refused naming the
    file, the cell and the field, never a traceback, and never taken as "missing" (which compare would pass)."""
    cell = make_record(variant="tensor_sum")
    cell[field] = value
    bad = write_results_json(tmp_path / "bad", [make_record(), cell])
    good = write_results_json(tmp_path / "good", [make_record(), make_record(variant="tensor_sum")])
    argv = {"report": ["report", str(bad)], "compare baseline": ["compare", str(bad), str(good)],
            "compare candidate": ["compare", str(good), str(bad)],
            "merge": ["merge", str(bad), str(good), "--out", str(tmp_path / "merged"), "--partial"]}[command]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, f"{bad}: {needle}")


def test_an_integer_of_more_digits_than_python_reads_is_one_line_and_exit_2(tmp_path, capsys):
    good = write_results_json(tmp_path / "good", [make_record()])
    text = good.read_text().replace('"ops_per_step": 120.0', '"ops_per_step": 1' + "0" * 5000)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["compare", str(good), str(bad)]) == 2
    _one_line(capsys.readouterr().err, f"{bad}: not readable JSON (Exceeds the limit")


@pytest.mark.parametrize("command", ["run", "check"])
def test_more_ranks_than_a_few_per_core_is_refused_before_any_starts(monkeypatch, capsys, command):
    """`--nproc-per-node 64` on 2 cores started 67 processes and took 13 GB without a word: above 4 ranks per core it
    is one line and exit 2, before any rank starts."""
    import bench.timing

    monkeypatch.setattr(bench.timing, "usable_cores", lambda: 2)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    assert main([command, "--nproc-per-node", "64", "--device", "cpu"]) == 2
    _one_line(capsys.readouterr().err, "--nproc-per-node 64: more than 4 processes per core (2 cores here)")


def test_more_ranks_than_cores_warns_and_up_to_cores_says_nothing(monkeypatch, capsys):
    import bench.cli
    import bench.timing

    monkeypatch.setattr(bench.timing, "usable_cores", lambda: 2)
    bench.cli._check_nproc(2)
    assert capsys.readouterr().err == ""
    bench.cli._check_nproc(8)
    _one_line(capsys.readouterr().err, "warning: --nproc-per-node 8 on 2 cores: the ranks share the cores")


def test_a_name_in_a_script_the_default_font_lacks_is_drawn_from_an_installed_font_that_has_it(monkeypatch):
    """A character the figures' font lacks (a CJK name in DejaVu Sans) is drawn from an installed font that has it:
    matplotlib then warns of no missing glyph. Here: a character only another installed font has."""
    import warnings

    import matplotlib
    from matplotlib import font_manager
    from matplotlib.font_manager import FontProperties

    default = plots._charmap(font_manager.findfont(FontProperties()))
    extra = sorted(ch for chars in plots._family_charmaps().values() for ch in chars - default if ch.isalpha())
    if not extra:
        pytest.skip("no installed font has a letter the default font lacks")
    with matplotlib.rc_context():
        df = to_frame(results.derive([make_record("w", "baseline", "cpu"), make_record("w", f"v{extra[0]}", "cpu")]))
        fig = plots.throughput(df)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Glyph .* missing from font")
            fig.savefig(BytesIO(), format="png", dpi=20)
        assert len(matplotlib.rcParams["font.family"]) > 1  # a fallback family added


def test_a_name_no_installed_font_can_draw_is_said_once(monkeypatch, tmp_path, capsys):
    """Drawn as boxes in every plot of the report, and said in one line; report.md shows the name."""
    import matplotlib

    monkeypatch.setattr(plots, "_said", [])
    nowhere = "\U0010fffd\U0010fffc"  # private use: in no font
    write_results_json(tmp_path / "r", [make_record(f"w{nowhere}", "baseline", "cpu")])
    with matplotlib.rc_context():
        assert main(["report", str(tmp_path / "r")]) == 0
    assert f"w{nowhere}" in (tmp_path / "r" / "report.md").read_text()
    _one_line(capsys.readouterr().err, f"plots: no installed font has the characters {''.join(sorted(nowhere))} of "
                                       "some names: the plots draw them as boxes")
