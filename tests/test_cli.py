"""The command line as a user meets it: exit codes, one-line errors, files written, interruption.

The end-to-end runs use the smallest settings `loopmark run` accepts (`--quick --steps 3 --repeats 2 --warmup 1`);
one run is shared by the tests that read it.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import bench.cli
from bench.cli import main
from reports.results import CSV_COLUMNS

REQUIRED_COLUMNS = (
    "workload, variant, device, device_name, torch_version, batch_size, steps, repeats, samples_per_s, "
    "step_time_median_s, step_time_iqr_s, step_time_ci_low_s, step_time_ci_high_s, ratio_to_baseline, "
    "syncs_per_step, ops_per_step, peak_memory_bytes, memory_growth_bytes_per_step, retains_graph, "
    "reported_loss, exact_loss, loss_rel_error, param_max_rel_diff, verdict, expected_verdict, "
    "energy_j_per_sample, status, error").split(", ")
USER = "loops.example_user"
SMALLEST = ["--device", "cpu", "--quick", "--steps", "3", "--repeats", "2", "--warmup", "1"]
FAILING_LOOP = ("import sys\n\n\ndef explode(run):\n    raise RuntimeError('boom')\n\n\n"
                "def leave(run):\n    sys.exit(0)\n")
# a workload whose forward never returns: the run is still inside it when the test interrupts it, however slow
WAITING_WORKLOAD = """import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from loops import Workload


class Waits(nn.Linear):
    def forward(self, x):
        while True:  # until the run is interrupted
            time.sleep(0.01)


def waiting():
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    return Workload(name="waiting", build_model=lambda: Waits(4, 2),
                    build_optimizer=lambda params: torch.optim.SGD(params, lr=0.1), criterion=nn.CrossEntropyLoss(),
                    train_data=data, test_data=data, batch_size=8)
"""


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """One `loopmark run` of a user's workload with a user's variant, a built-in one and a user's variant that
    raises: (its argv, its output directory)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "failing_loop.py").write_text(FAILING_LOOP)
    argv = ["run", *SMALLEST, "--workload", f"{USER}:regression", "--variant", f"{USER}:clipped_loop",
            "--variant", "tensor_sum", "--variant", "failing_loop:explode", "--variant", "failing_loop:leave",
            "--out", str(root / "r")]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.delitem(sys.modules, "failing_loop", raising=False)
        assert main(argv) == 0
    return argv, root / "r"


def _rows(out) -> dict:
    with open(out / "results.csv") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def _cells(out) -> dict:
    return {c["variant"]: c for c in json.loads((out / "results.json").read_text())["cells"]}


def _measured(cell: dict) -> dict:
    """What a cell measured itself: not its ratios, nor their `reliability`, which follow its baseline's blocks."""
    return {k: v for k, v in cell.items() if not k.startswith("ratio") and k != "reliability"}


def test_list_shows_variants_and_workloads(capsys):
    """`loopmark list` names the variants and the workloads."""
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("baseline", "zero_grad_missing", "eval_graph_sum", "conditional", "digits"):
        assert name in out


@pytest.mark.parametrize("argv,needle", [
    (["check", "--variant", "nope"], "unknown variant 'nope'; valid: a built-in (`loopmark list` names them)"),
    (["check", "--workload", "nope"], "unknown workload 'nope'; valid: mlp"),
    (["run", "--variant", "tensr_sum"], "unknown variant 'tensr_sum'; did you mean 'tensor_sum'?"),
    (["run", "--workload", "mpl"], "unknown workload 'mpl'; did you mean 'mlp'?"),
    (["check", "--variant", "tensor_sum+set_to_nne_false"], "variant 'set_to_nne_false'; did you mean 'set_to_none_"),
    (["selfcheck", "--workload", "mpl"], "unknown workload 'mpl'; did you mean 'mlp'?"),
    (["check", "--workload", "no_such_module:f"], "cannot import 'no_such_module'"),
    (["check", "--variant", "loops.example_user:missing"], "has no callable 'missing'"),
    (["run", "--variant", "tensor_sum+item_list_mean"], "changes loss_tracking a second time"),
    (["run", "--variant", "baseline+eval_baseline"], "cannot compose training and evaluation"),
    (["check", "--steps", "0"], "argument --steps: 0 is less than 1"),
    (["check", "--epochs", "0"], "argument --epochs: 0 is less than 1"),
    (["check", "--steps", "-1"], "argument --steps: -1 is less than 1"),
    (["run", "--warmup", "-1"], "argument --warmup: -1 is less than 0"),
    (["run", "--steps", "two"], "argument --steps: 'two' is not a whole number"),
    (["compare", "a", "b", "--alpha", "3"], "argument --alpha: 3 is not between 0 and 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    """A name that does not resolve is one line on stderr, no traceback, exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,code", [(["run", "--variant", "tensr_sum"], 2), (["check", "--workload", "mpl"], 2),
                                       (["run", "--workload", "mlp", "--variant", "tensor_sum+nope"], 2),
                                       ([], 2), (["--help"], 0), (["--version"], 0)])
def test_a_misspelt_name_help_and_version_answer_before_torch_is_imported(argv, code):
    """A built-in name is checked against `loops.registry`, which loads no torch (seconds of import): a typo, like
    --help and --version, is answered at once."""
    script = f"import sys; from bench.cli import main; code = main({argv!r}); print(code, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == [str(code), "False"], out.stderr


def test_no_command_lists_each_command_on_one_line_and_exits_2(capsys):
    """`loopmark` alone says what there is to do: every command, one line each, on stderr; exit 2 (no command)."""
    from bench.cli import COMMANDS

    assert main([]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and lines[0].startswith("usage: loopmark COMMAND")
    for command in COMMANDS:
        assert len([line for line in lines if line.split()[:1] == [command]]) == 1, (command, lines)


def test_cuda_request_without_gpu_is_exit_2(capsys):
    """`--device cuda` on a machine without a GPU is bad input (exit 2), not a crash."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    for command in ("check", "selfcheck"):  # `all` is no device of theirs
        assert main([command, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.rstrip().endswith("valid: cpu"), err


def test_version_is_the_package_version(capsys):
    """`loopmark --version` prints the installed package's version."""
    import bench

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"loopmark {bench.__version__}"


def test_check_passes_on_builtins_and_fails_on_a_broken_user_loop(capsys):
    """`loopmark check` exits 0 when built-ins get their declared verdicts and a user's loops are not broken, and
    1 with the reason when a user's loop is broken."""
    short = ["--epochs", "2", "--steps", "2"]
    assert main(["check", *short, "--workload", "mlp", "--variant", "baseline", "--variant",
                 "zero_grad_missing"]) == 0
    assert main(["check", *short, "--workload", f"{USER}:regression", "--variant", f"{USER}:clipped_loop",
                 "--variant", f"{USER}:eval_argmax"]) == 0
    capsys.readouterr()
    assert main(["check", *short, "--workload", f"{USER}:regression", "--variant", f"{USER}:forgot_zero_grad"]) == 1
    assert "step 2 consumed the sum of 2 batch gradients" in capsys.readouterr().out


def test_check_shared_out_among_processes_gives_the_rows_one_process_gives(capsys, monkeypatch):
    """`check --jobs 2` checks cells in two processes forked from the command's (here this test's, a process of one
    thread), each judging against its own baseline: the table is the one `--jobs 1` prints, row for row, in the same
    order; a user's workload is checked as a built-in is."""
    from bench import launcher

    argv = ["check", "--epochs", "2", "--steps", "2", "--workload", "mlp", "--workload", f"{USER}:regression",
            "--variant", "baseline", "--variant", "graph_sum", "--variant", "zero_grad_missing", "--variant",
            "tensor_sum"]
    capsys.readouterr()
    assert main([*argv, "--jobs", "1"]) == 0
    alone = capsys.readouterr().out
    jobs, real = [], launcher.forked_map
    monkeypatch.setattr(launcher, "forked_map", lambda func, items, n, *a, **k: (jobs.append(n),
                                                                                 real(func, items, n, *a, **k))[1])
    # else `check` checks in order, in this process: a thread a test left running would say so here
    assert launcher.fork_safe(), [t.name for t in threading.enumerate()]
    assert main([*argv, "--jobs", "2"]) == 0
    assert jobs == [2] and capsys.readouterr().out == alone
    assert [line.split()[:3] for line in alone.splitlines()[1:4]] == [
        ["mlp", "baseline", "identical"], ["mlp", "graph_sum", "broken"], ["mlp", "zero_grad_missing", "broken"]]


def test_run_with_a_user_workload_and_variant_writes_every_column(user_run):
    """`loopmark run` with a user's workload and variant writes every CSV column, the baseline beside them, every
    timed step and the environment."""
    _, out = user_run
    rows = _rows(out)
    assert set(REQUIRED_COLUMNS) <= set(rows["baseline"]) and list(rows["baseline"]) == CSV_COLUMNS
    assert set(rows) == {"baseline", f"{USER}:clipped_loop", "tensor_sum", "failing_loop:explode",
                         "failing_loop:leave"}
    assert all(rows[v]["status"] == "ok" for v in ("baseline", f"{USER}:clipped_loop", "tensor_sum"))
    cells = _cells(out)
    assert all(len(cells[v]["step_times_s"]) == 3 * 2 for v in ("baseline", f"{USER}:clipped_loop", "tensor_sum"))
    assert "torch" in json.loads((out / "results.json").read_text())["environment"]
    assert (out / "report.md").exists()


def test_a_failing_user_variant_does_not_lose_the_other_cells(user_run):
    """A user's variant that raises ends as `error` with its message; the other cells of its run are `ok`."""
    _, out = user_run
    rows = _rows(out)
    assert rows["failing_loop:explode"]["status"] == "error" and "boom" in rows["failing_loop:explode"]["error"]
    assert rows["failing_loop:leave"]["status"] == "error"  # sys.exit(0) in a loop ends its cell, not the run
    assert rows["failing_loop:leave"]["error"] == "the loop called sys.exit(0)"
    assert rows["tensor_sum"]["status"] == "ok" and rows["baseline"]["status"] == "ok"


def test_resume_skips_finished_cells(user_run, tmp_path, monkeypatch):
    """`--resume` keeps every finished cell's measurements as they were and runs only the new cells."""
    argv, shared = user_run
    out = tmp_path / "r"
    shutil.copytree(shared, out)
    monkeypatch.syspath_prepend(str(shared.parent))
    before = _cells(out)
    assert main([*argv[:-1], str(out), "--variant", "graph_sum", "--resume"]) == 0
    after = _cells(out)
    for variant in (f"{USER}:clipped_loop", "tensor_sum"):  # as measured; ratios follow the re-timed baseline
        assert _measured(after[variant]) == _measured(before[variant])
        assert after[variant]["step_times_s"] == before[variant]["step_times_s"]
        # the numbers in one file agree: a kept cell's ratio is over the baseline now in the file
        assert after[variant]["ratio_to_baseline"] == pytest.approx(
            after[variant]["step_time_median_s"] / after["baseline"]["step_time_median_s"])
    assert after["graph_sum"]["status"] == "ok" and after["graph_sum"]["verdict"] == "broken"


def test_sigint_leaves_valid_files_with_every_finished_cell(tmp_path):
    """Ctrl-C while a cell is measured exits 130 without a traceback, and the files hold every cell finished before.
    The second workload's forward never returns: the signal lands inside its cells however loaded the machine is."""
    out = tmp_path / "r"
    (tmp_path / "waiting_workload.py").write_text(WAITING_WORKLOAD)
    cmd = [sys.executable, "-m", "bench", "run", *SMALLEST, "--workload", "digits", "--workload",
           "waiting_workload:waiting", "--variant", "tensor_sum", "--out", str(out)]
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    # Ctrl-C as a terminal sends it: a shell that starts a command in the background without job control (CI's
    # `cmd &`) ignores SIGINT in it and in every process it starts, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    finished = re.compile(r"^cpu\s+digits\s+\S+\s+ok\b")
    deadline = time.time() + 240
    try:
        # a cell's progress line is printed once both files hold it: digits' two cells are written, the waiting
        # workload's are running (and stay so until the signal)
        while time.time() < deadline and proc.poll() is None and sum(map(bool, map(finished.match, lines))) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    cells = json.loads((out / "results.json").read_text())["cells"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(cells) == 2 and len(rows) == len(cells)
    assert all(c["workload"] == "digits" and c["status"] == "ok" and c["step_times_s"] for c in cells)


def test_the_summary_after_a_run_flags_unreliable_ratios_and_says_why_the_speed_columns_differ(capsys):
    """A ratio whose timing was disturbed is marked `?` with a line saying so (as report.md does); where the ratio
    and the samples/s of a cell disagree (998/330 is 3x, the ratio 7.94x), a line says why they can."""
    def cell(variant, sps, ratio, reliability):
        return {"device": "cpu", "workload": "mlp", "variant": variant, "baseline_variant": "baseline",
                "samples_per_s": sps, "ratio_to_baseline": ratio, "reliability": reliability, "status": "ok",
                "syncs_per_step": 1.0, "memory_growth_bytes_per_step": 0.0, "verdict": "identical"}

    bench.cli._summary([cell("baseline", 998.0, 1.0, "ok"), cell("tensor_sum", 500.0, 2.0, "ok")])
    out = capsys.readouterr().out
    assert "?" not in out and "disagree" not in out  # steady: 998/500 is the ratio
    bench.cli._summary([cell("baseline", 998.0, 1.0, "unreliable: waited"), cell("tensor_sum", 330.0, 7.94,
                                                                                 "unreliable: waited")])
    out = capsys.readouterr().out
    assert re.search(r"tensor_sum\s+330\s+7\.940\?", out) and re.search(r"baseline\s+998\s+1\.000 ", out)
    assert "?: 1 of 1 ratios unreliable" in out
    assert "ratio and samples/s disagree by more than 10% for 1 cell(s)" in out
