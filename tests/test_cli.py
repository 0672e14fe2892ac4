"""The command line as a user meets it: exit codes, one-line errors, files written, interruption."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.cli import main
from bench.results import CSV_COLUMNS

REQUIRED_COLUMNS = (
    "workload, variant, device, device_name, torch_version, batch_size, steps, repeats, samples_per_s, "
    "step_time_median_s, step_time_iqr_s, step_time_ci_low_s, step_time_ci_high_s, ratio_to_baseline, "
    "syncs_per_step, ops_per_step, peak_memory_bytes, memory_growth_bytes_per_step, retains_graph, "
    "reported_loss, exact_loss, loss_rel_error, param_max_rel_diff, verdict, expected_verdict, "
    "energy_j_per_sample, status, error").split(", ")


def test_list_shows_variants_and_workloads(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("baseline", "zero_grad_missing", "eval_graph_sum", "conditional", "digits"):
        assert name in out


@pytest.mark.parametrize("argv,needle", [
    (["check", "--variant", "nope"], "unknown variant 'nope'; valid: baseline"),
    (["check", "--workload", "nope"], "unknown workload 'nope'; valid: mlp"),
    (["check", "--workload", "no_such_module:f"], "cannot import 'no_such_module'"),
    (["check", "--variant", "loops.example_user:missing"], "has no callable 'missing'"),
    (["run", "--variant", "tensor_sum+item_list_mean"], "changes loss_tracking a second time"),
    (["run", "--variant", "baseline+eval_baseline"], "cannot compose training and evaluation"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cuda_request_without_gpu_is_exit_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_check_passes_on_builtins_and_fails_on_a_broken_user_loop(capsys):
    user = "loops.example_user"
    assert main(["check", "--workload", "mlp", "--variant", "baseline", "--variant", "zero_grad_missing"]) == 0
    assert main(["check", "--workload", f"{user}:regression", "--variant", f"{user}:clipped_loop",
                 "--variant", f"{user}:eval_argmax"]) == 0
    assert main(["check", "--workload", f"{user}:regression", "--variant", f"{user}:forgot_zero_grad"]) == 1
    assert "step 2 consumed the sum of 2 batch gradients" in capsys.readouterr().out


def test_run_with_a_user_workload_and_variant_writes_every_column(tmp_path, capsys):
    user = "loops.example_user"
    out = tmp_path / "r"
    argv = ["run", "--device", "cpu", "--workload", f"{user}:regression", "--variant", f"{user}:clipped_loop",
            "--variant", "tensor_sum", "--steps", "4", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(REQUIRED_COLUMNS) <= set(rows[0]) and list(rows[0]) == CSV_COLUMNS
    assert {r["variant"] for r in rows} == {"baseline", f"{user}:clipped_loop", "tensor_sum"}
    assert all(r["status"] == "ok" for r in rows)
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert all(len(c["step_times_s"]) == 8 for c in cells)
    assert "torch" in json.loads((out / "results.json").read_text())["environment"]


def test_a_failing_user_variant_does_not_lose_the_other_cells(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "failing_loop.py").write_text("def explode(run):\n    raise RuntimeError('boom')\n")
    out = tmp_path / "r"
    argv = ["run", "--device", "cpu", "--workload", "mlp", "--variant", "failing_loop:explode",
            "--variant", "tensor_sum", "--steps", "4", "--repeats", "1", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert rows["failing_loop:explode"]["status"] == "error" and "boom" in rows["failing_loop:explode"]["error"]
    assert rows["tensor_sum"]["status"] == "ok" and rows["baseline"]["status"] == "ok"


def test_resume_skips_finished_cells(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["run", "--device", "cpu", "--workload", "digits", "--steps", "4", "--repeats", "1", "--warmup", "1",
            "--out", str(out)]
    assert main(base + ["--variant", "tensor_sum"]) == 0
    before = {c["variant"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert main(base + ["--variant", "tensor_sum", "--variant", "graph_sum", "--resume"]) == 0
    after = {c["variant"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert after["tensor_sum"] == before["tensor_sum"] and after["graph_sum"]["status"] == "ok"


def test_sigint_leaves_valid_files_with_every_finished_cell(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "bench", "run", "--device", "cpu", "--workload", "digits", "--workload", "cnn",
           "--variant", "tensor_sum", "--steps", "10", "--repeats", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            cells = json.loads((out / "results.json").read_text())["cells"]
        except (OSError, ValueError):
            cells = []
        if len(cells) >= 2:  # digits' two cells are finished, cnn's are running
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    cells = json.loads((out / "results.json").read_text())["cells"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert 2 <= len(cells) < 4 and len(rows) == len(cells)
    assert all(c["status"] == "ok" and c["step_times_s"] for c in cells)


def test_selfcheck_prints_its_table(capsys):
    assert main(["selfcheck", "--workload", "digits"]) == 0
    out = capsys.readouterr().out
    for check in ("per-step marks vs the same loop timed whole", "torch.utils.benchmark", "ratio_to_baseline"):
        assert check in out
