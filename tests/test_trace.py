"""`loopmark trace`: an unmodified training script, run in this process, measured step by step.

The example scripts (loops/examples/) are complete training scripts that choose their device with
`torch.cuda.is_available()`; each works out its CUDA syncs per step from its code in its docstring, and the traces here,
made on a machine without a GPU, must count exactly that: the script runs as on a machine with one. Small scripts
written here cover the cases a script can put a tracer in (rounds of several optimizers, a GradScaler that skips a
step, a kept autograd graph, a non-finite loss, a script that raises, exits, ends early or never steps, `-m`).
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bench.cli
from bench import trace
from bench.cli import main
from bench.target import module_target, script_target
from reports import stats

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "loops" / "examples"

# A tiny script written the usual way: the device from torch.cuda.is_available(), host batches moved with .to(device).
# CUDA syncs per step: 2 blocking copies (data, target), plus what EXTRA adds.
TINY = """\
import sys
import torch
from torch import nn

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
{setup}
for step in range({steps}):
{before}
    data, target = x.to(device), y.to(device)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(data), target)
    loss.backward()
    optimizer.step()
{after}
"""


def tiny(tmp_path: Path, steps: int = 100, setup: str = "", before: str = "", after: str = "",
         name: str = "train.py") -> Path:
    def indent(code):
        return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") if code else ""
    path = tmp_path / name
    path.write_text(TINY.format(steps=steps, setup=textwrap.dedent(setup), before=indent(before), after=indent(after)))
    return path


def traced(path: Path, *args: str, steps: int = 3, warmup: int = 1) -> trace.Trace:
    return trace.trace(script_target(str(path), list(args)), steps, warmup)


def line_of(path: Path, code: str) -> int:
    """The number of the line of `path` holding `code`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if code in line)


# -- the example scripts: the CUDA count, worked out in each script's docstring --------------------------------

# the audit pass's verdict, from each script's code: every example zeroes its gradients before each step's backward
# passes and steps once per accumulation; train_text_classifier clips at 0.1, which binds on its random-init model's
# gradients (a scaled copy: different); train_amp's and train_grad_accum's clipping (5.0, 1.0) does not bind on theirs
EXAMPLE_VERDICTS = {"train_mnist_like.py": "consistent", "train_amp.py": "consistent",
                    "train_grad_accum.py": "consistent", "train_gan.py": "consistent",
                    "train_text_classifier.py": "different"}


@pytest.mark.parametrize(("script", "args", "steps", "warmup", "syncs"), [
    # 2 copies + loss.item() every 5 batches (the log line of batch 0 of epoch 2 falls in step 7); 5-batch epochs:
    # test() runs in the count pass (steps 4-8), after step 5, and is counted apart. A DataLoader worker per loader
    # (the script's CUDA branch).
    ("train_mnist_like.py", ["--epochs", "9", "--train-size", "20", "--batch-size", "4", "--test-size", "8",
                             "--test-batch-size", "4", "--log-interval", "5"], 5, 3, 2 + 1 / 5),
    # scaler.step's found_inf.item() + loss.item() every 4 steps; pinned batches copied non_blocking: 0
    ("train_amp.py", ["--epochs", "1", "--train-size", "640", "--batch-size", "8", "--width", "4", "--workers", "0",
                      "--log-interval", "4"], 4, 2, 1 + 1 / 4),
    # 2 copies per micro-batch x 2 micro-batches + total_loss.item() every 2 optimizer steps
    ("train_grad_accum.py", ["--epochs", "1", "--train-size", "256", "--batch-size", "2", "--seq-len", "8",
                             "--d-model", "16", "--gradient-accumulation-steps", "2", "--log-interval", "2"],
     4, 2, 2 * 2 + 1 / 2),
    # a step is a round of optimizerD and optimizerG: 1 copy + D(x), D(G(z1)), D(G(z2)) + 2 .item() every 2 batches
    # + one .cpu() every 4 batches
    ("train_gan.py", ["--niter", "1", "--dataset-size", "640", "--batchSize", "8", "--nz", "8", "--ngf", "4",
                      "--ndf", "4", "--log-interval", "2", "--sample-interval", "4"], 4, 3, 4 + 2 / 2 + 1 / 4),
    # 3 copies + the accuracy's .item() + loss.item() logged every step
    ("train_text_classifier.py", ["--epochs", "1", "--train-size", "320", "--batch-size", "16", "--quiet"], 3, 1, 5),
])
def test_an_example_script_counts_its_cuda_syncs_on_a_cpu(script, args, steps, warmup, syncs):
    result = traced(EXAMPLES / script, *args, steps=steps, warmup=warmup)
    r = result.record
    rounds = 2 if script == "train_gan.py" else 1  # a GAN's step is a round of two optimizer steps
    assert (r["verdict"], r["audit_steps"]) == (EXAMPLE_VERDICTS[script], steps * rounds), r["verdict_reason"]
    assert (r["status"], result.exit_code, result.outcome.how) == ("ok", 0, "stopped"), r["error"]
    assert r["workload"] == script and r["variant"] == "trace" and r["device"] == "cpu"
    assert r["trace_passes"] == {"count": steps, "audit": steps, "time": steps, "memory": steps}
    assert r["syncs_per_step"] == pytest.approx(syncs)
    assert sum(d["count"] for d in r["sync_site_details"]) == pytest.approx(syncs * steps)
    assert all(d["site"].rpartition(":")[0] == script for d in r["sync_site_details"])  # relative to its directory
    assert r["retains_graph"] is False and r["nonfinite_loss_steps"] == [] and r["skipped_steps"] == 0
    assert len(r["step_times_s"]) == steps and min(r["step_times_s"]) > 0
    assert r["peak_memory_bytes"] > 0 and len(r["memory_trace_bytes"]) == steps
    if script == "train_mnist_like.py":  # test(): 2 test batches x (2 copies + 2 .item()), apart from the steps
        assert (r["eval_passes"], r["eval_syncs"]) == (1, 8)
        assert sum(r["eval_sync_sites"].values()) == 8
        assert r["eval_passes_by_pass"] == {"count": 1, "audit": 1, "time": 1, "memory": 1}  # test() in each pass
        assert ("4 pass(es)  1 in the count pass, 1 in the audit pass, 1 in the time pass, 1 in the memory pass: "
                "8 syncs") in trace.summary(r)
        elsewhere = {**r, "eval_passes": 0, "eval_passes_by_pass": {"time": 1}}  # fell in the time pass instead
        assert "1 in the time pass: its syncs not counted" in trace.summary(elsewhere)
        assert multiprocessing.active_children() == []  # its DataLoader workers ended with the script
    if script == "train_amp.py":  # the GradScaler, made only where CUDA is, reads its inf/NaN flag back
        scaler = [d for d in r["sync_site_details"] if d["code"] == "scaler.step(optimizer)"]
        assert [(d["per_step"], list(d["operations"])) for d in scaler] == [(1.0, ["aten::_local_scalar_dense"])]


def test_the_count_follows_the_scripts_cuda_branch():
    """train_amp.py makes its GradScaler only where CUDA is (`use_amp = args.amp and device.type == "cuda"`): traced
    on a CPU it takes that branch (above: 1 + 1/4 syncs per step, the scaler's read-back at `scaler.step`), and
    `--no-amp`, which turns the scaler off on CUDA too, takes that sync away."""
    args = ["--epochs", "1", "--train-size", "640", "--batch-size", "8", "--width", "4", "--workers", "0",
            "--log-interval", "4", "--no-amp"]
    r = traced(EXAMPLES / "train_amp.py", *args, steps=4, warmup=2).record
    assert r["syncs_per_step"] == 1 / 4 and [d["code"] for d in r["sync_site_details"]] == [
        'print(f"epoch {epoch} step {step}/{len(loader)} loss {loss.item():.4f} "']
    assert not torch.cuda.is_available()  # the machine is as it was


# -- steps ------------------------------------------------------------------------------------------------------

def test_a_step_is_a_round_of_several_optimizers(tmp_path):
    """A WGAN-style loop: three critic steps, then one generator step, is one step; each critic step reads its loss."""
    path = tiny(tmp_path, setup="""
        critic = torch.nn.Linear(2, 1).to(device)
        critic_opt = torch.optim.Adam(critic.parameters())
        """, before="""
        for _ in range(3):
            critic_opt.zero_grad()
            critic_loss = critic(model(x.to(device, non_blocking=True))).mean()
            critic_loss.backward()
            critic_opt.step()
            critic_loss.item()
        """)
    r = traced(path, steps=3, warmup=4).record  # iteration 0 is one step (its 3 critic steps, then SGD's)
    assert r["syncs_per_step"] == 3 + 2 and r["trace_optimizers"] == ["Adam", "SGD"]
    assert r["trace_notes"] == []


def test_the_first_round_of_several_optimizers_is_one_step(tmp_path):
    """DCGAN's order: the discriminator (Adam) steps first, then the generator (SGD); what iteration 0 does after the
    generator's step (an image saved at `i == 0`: one more sync) falls in the warm-up. Had the discriminator's first
    step ended a step of its own, the warm-up of 2 would have ended inside iteration 0 and counted that sync."""
    path = tiny(tmp_path, setup="""
        critic = torch.nn.Linear(2, 1).to(device)
        critic_opt = torch.optim.Adam(critic.parameters())
        """, before="""
        critic_opt.zero_grad()
        critic_loss = critic(model(x.to(device, non_blocking=True))).mean()
        critic_loss.backward()
        critic_opt.step()
        critic_loss.item()
        """, after="""
        if step == 0:
            loss.item()
        """)
    r = traced(path, steps=3, warmup=2).record
    assert r["syncs_by_step"] == [3, 3, 3] and r["trace_steps_run"] == 2 + 4 * 3  # 2 copies + the critic's .item()
    assert r["trace_optimizers"] == ["Adam", "SGD"] and r["audit_steps"] == 2 * 3 and r["trace_notes"] == []


def test_a_single_optimizer_script_waits_for_no_optimizer_it_never_steps(tmp_path):
    """An optimizer the script makes and never steps would hold the first round open: after FIRST_ROUND_LIMIT
    optimizer steps the first step ends without it, and a note says so."""
    path = tiny(tmp_path, steps=200, setup="unused = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())")
    r = traced(path, steps=2, warmup=1).record
    assert r["status"] == "ok" and r["trace_passes"]["count"] == 2 and r["syncs_by_step"] == [2, 2]
    assert "(Adam) that had not stepped after 100 optimizer steps" in r["trace_notes"][0]


def test_a_step_the_grad_scaler_skips_is_still_one_step(tmp_path):
    """Infinite gradients on two iterations: the scaler skips `optimizer.step()` there, and each is one step all the
    same (a merged step would hold two of everything)."""
    path = tiny(tmp_path, setup="""
        scaler = torch.amp.GradScaler("cuda", enabled=torch.cuda.is_available())
        """, before="""
        hook = model[0].weight.register_hook(lambda g: g * float("inf")) if step in (4, 6) else None
        data, target = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if hook is not None:
            hook.remove()
        continue
        """)
    r = traced(path, steps=4, warmup=2).record  # iterations 2-5 are counted: 4 and 6 fall in the count and time passes
    assert r["skipped_steps"] == 2
    assert r["syncs_by_step"] == [3, 3, 3, 3]  # 2 copies + the scaler's read-back, skipped or not
    assert r["status"] == "ok" and r["nonfinite_loss_steps"] == []  # the loss itself stayed finite


@pytest.mark.parametrize(("accumulate", "kept"), [("running += loss", True), ("running += loss.detach()", False)])
def test_a_graph_kept_across_steps_is_found(tmp_path, accumulate, kept):
    path = tiny(tmp_path, setup="running = torch.zeros((), device=device)", after=accumulate)
    r = traced(path, steps=4, warmup=1).record
    assert r["retains_graph"] is kept
    assert r["graph_retained_steps"] == (16 - trace.GRAPH_LAG if kept else 0)  # every measured step checked
    assert r["syncs_per_step"] == 2


def test_a_non_finite_loss_makes_the_trace_diverged(tmp_path):
    path = tiny(tmp_path, before="""
        if step == 5:
            x[0, 0] = float("nan")
        """)
    r = traced(path, steps=3, warmup=1).record
    assert r["status"] == "diverged" and r["nonfinite_loss_steps"][:2] == [6, 7]
    assert "non-finite loss at step(s) 6, 7" in r["error"]


@pytest.mark.parametrize("device", ["cuda", "cpu"], ids=["on-the-gpu", "cpu-only"])
def test_the_heading_and_report_say_whether_the_tensors_reached_the_stand_in(tmp_path, monkeypatch, capsys, device):
    """A script that puts its tensors on the (stand-in) GPU gets the CUDA count; one that keeps them on the CPU
    (Trainer's `use_cpu=True`, Lightning's `accelerator="cpu"`) does not: its heading and report say so."""
    path = tiny(tmp_path)
    path.write_text(path.read_text().replace(
        'device = "cuda" if torch.cuda.is_available() else "cpu"', f'device = "{device}"'))
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "--steps", "2", "--warmup", "1", "--out", "out", str(path)]) == 0
    heading = capsys.readouterr().out.strip().splitlines()[0]
    report = (tmp_path / "out" / "report.md").read_text()
    r = json.loads((tmp_path / "out" / "results.json").read_text())["cells"][0]
    if device == "cuda":
        assert r["reached_device"] is True and r["syncs_per_step"] == 2
        assert heading.startswith("trace of train.py on cpu (the CUDA count, with cpu:0 standing for the GPU)")
        assert "- device: cpu (the CUDA count" in report
    else:
        assert r["reached_device"] is False and r["syncs_per_step"] == 0
        assert "CUDA count, with" not in heading and "none reached the stand-in GPU" in heading
        assert "- device: cpu (the script kept its tensors on the CPU: none reached the stand-in GPU" in report


# -- how a script is run, and how it ends -----------------------------------------------------------------------

SCRIPT = """\
import os
import sys

import torch

import helper

assert __name__ == "__main__" and helper.VALUE == 42
assert sys.argv[1:] == ["--lr", "0.5"] and os.path.samefile(sys.argv[0], __file__), sys.argv
assert sys.path[0] == os.path.dirname(os.path.abspath(__file__)), sys.path[0]
device = "cuda" if torch.cuda.is_available() else "cpu"
model = torch.nn.Linear(3, 1).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=float(sys.argv[2]))
try:
    for step in range(1000):
        optimizer.zero_grad()
        model(torch.ones(3, device=device)).sum().backward()
        optimizer.step()
except Exception:
    print("an Exception does not catch the stop")
finally:
    open("finally.txt", "w").write(str(step))
"""


def test_the_script_runs_as_python_runs_it_and_its_finally_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "helper.py").write_text("VALUE = 42\n")
    (tmp_path / "train.py").write_text(SCRIPT)
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    result = traced(tmp_path / "train.py", "--lr", "0.5", steps=2, warmup=1)
    assert result.outcome.how == "stopped", result.outcome.detail
    assert result.record["trace_steps_run"] == 1 + 4 * 2 and result.record["syncs_per_step"] == 0
    assert (tmp_path / "finally.txt").read_text() == "8"  # stopped in the 9th iteration's optimizer.step()
    assert "does not catch" not in capsys.readouterr().out
    assert (sys.argv, sys.path) == (saved_argv, saved_path)


@pytest.mark.parametrize(("ending", "how", "exit_code", "status"), [
    ('raise RuntimeError("out of data")', "raised", 1, "error"),
    ("sys.exit(3)", "exited", 1, "error"),
    ("break", "ended", 0, "ok"),
])
def test_a_script_that_stops_early_keeps_what_was_measured(tmp_path, ending, how, exit_code, status):
    """Iterations 0-2 step (boundaries 1-3): with one warm-up step the count pass has 2 of its 5 steps."""
    path = tiny(tmp_path, before=f"""
        if step == 3:
            {ending}
        """)
    result = traced(path, steps=5, warmup=1)
    r = result.record
    assert (result.outcome.how, result.exit_code, r["status"]) == (how, exit_code, status)
    assert r["trace_passes"] == {"count": 2, "audit": 0, "time": 0, "memory": 0} and r["syncs_per_step"] == 2
    assert "after 3 of the 21 steps planned (1 warm-up + 4 passes of 5)" in r["trace_notes"][-1]
    assert r["verdict"] == "unverified" and "before the audit pass" in r["verdict_reason"]
    if how == "raised":
        assert "out of data" in r["error"]
        assert f'{path}", line {line_of(path, "raise RuntimeError")}' in result.outcome.traceback_text()


def test_a_script_that_calls_os_exit_keeps_what_was_measured(tmp_path):
    """`os._exit(7)` ends the process with no exception to unwind: the trace is written before it, and loopmark
    exits 1 (a script that exited with another status), not 7. Its own process: os._exit would end pytest's."""
    path = tiny(tmp_path, before="""
        if step == 3:
            import os
            os._exit(7)
        """)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bench", "trace", "--steps", "5", "--warmup", "1", "--out", str(out),
                           str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    [r] = json.loads((out / "results.json").read_text())["cells"]
    assert (r["status"], r["trace_passes"]["count"], r["syncs_per_step"]) == ("error", 2, 2)
    assert r["error"] == "the script called os._exit(7) at step 4"
    assert (out / "report.md").exists() and "error: the script called os._exit(7)" in done.stdout


def test_a_script_that_never_steps_is_an_error(tmp_path, capsys):
    path = tmp_path / "infer.py"
    path.write_text("import torch\nprint(torch.nn.Linear(2, 2)(torch.ones(2)).sum().item())\n")
    result = traced(path)
    assert (result.exit_code, result.record["status"]) == (1, "error")
    assert result.record["error"] == "the script never called optimizer.step() (it ended without one)"


def test_a_module_runs_as_python_dash_m(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    tiny(package, name="train.py", setup="assert __name__ == '__main__' and sys.argv[1:] == ['--fast'], sys.argv")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = trace.trace(module_target("mypkg.train", ["--fast"]), 2, 1)
    assert (result.record["workload"], result.record["status"], result.record["syncs_per_step"]) == (
        "mypkg.train", "ok", 2)


# -- the command line: bad input, results, report, compare ------------------------------------------------------

@pytest.mark.parametrize(("argv", "needle"), [
    (["trace", "no_such_script.py"], "no_such_script.py: no such file"),
    (["trace", "SYNTAX"], "syntax error at line 2"),
    (["trace", "--steps", "0", "x.py"], "argument --steps: 0 is less than 1"),
    (["trace", "-m", "no_such_module_for_loopmark"], "-m no_such_module_for_loopmark"),
    (["trace"], "give the script to trace"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SYNTAX").write_text("import torch\ndef broken(:\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_two_traces_compare_clean_and_a_planted_item_fails_naming_its_line(tmp_path, monkeypatch, capsys):
    """The CI example of docs/trace.md ("Trace in CI") in small: trace, trace again, compare (exit 0); add `.item()`
    to the loop, trace, compare (exit 1, the new line named with its code, the moved log line not reported);
    `loopmark report` on it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.cli, "_report", lambda paths: True)  # `loopmark report` is run once, below
    path = tiny(tmp_path, setup="""
        import argparse
        parser = argparse.ArgumentParser()
        parser.add_argument("--steps", type=int)
        assert parser.parse_args().steps == 7  # the script's own --steps, after it
        """, after="if step % 2 == 0:\n    print(f'loss {loss.item():.3f}')")
    options = ["trace", "--steps", "4", "--warmup", "1"]
    assert main([*options, "--out", "base", "train.py", "--steps", "7"]) == 0
    assert main([*options, "--out", "now", "train.py", "--steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "host-device syncs" in out and "blocking host-to-device copy" in out
    assert "sync sites, most syncs first (2 of 2)" in out and f"train.py:{line_of(path, 'x.to(device)')} " in out
    assert main(["compare", "base", "now", "--only-deterministic"]) == 0
    script = (tmp_path / "train.py").read_text().replace("    loss.backward()\n",
                                                        "    loss.backward()\n    last = loss.item()\n")
    (tmp_path / "train.py").write_text(script)
    assert main([*options, "--out", "planted", "train.py", "--steps", "7"]) == 0
    capsys.readouterr()
    assert main(["compare", "base", "planted", "--only-deterministic"]) == 1
    out = capsys.readouterr().out
    planted = line_of(path, "last = loss.item()")
    assert f"syncs/step changed: 2.5 -> 3.5 (+1/step at train.py:{planted} `last = loss.item()`)" in out
    assert main(["report", "planted"]) == 0
    assert {"results.json", "results.csv", "report.md", "report.html"} <= {p.name for p in (tmp_path / "planted")
                                                                           .iterdir()}
    report = (tmp_path / "planted" / "report.md").read_text()
    assert "train.py: sync sites (3 of 3, most syncs first)" in report and "`last = loss.item()`" in report
    assert "not interleaved with a baseline's" in report and "interleaved with its baseline's" not in report
    cell = json.loads((tmp_path / "planted" / "results.json").read_text())["cells"][0]
    assert (cell["workload"], cell["variant"], cell["syncs_per_step"]) == ("train.py", "trace", 3.5)


@pytest.mark.cuda
@pytest.mark.parametrize(("script", "args", "syncs"), [
    ("train_amp.py", ["--epochs", "1", "--train-size", "640", "--batch-size", "8", "--width", "4", "--workers", "0",
                      "--log-interval", "4"], 1 + 1 / 4),
    ("train_gan.py", ["--niter", "1", "--dataset-size", "640", "--batchSize", "8", "--log-interval", "2",
                      "--sample-interval", "4"], 4 + 2 / 2 + 1 / 4),
])
def test_on_a_gpu_the_count_is_the_same_and_the_debug_mode_agrees(script, args, syncs):
    r = traced(EXAMPLES / script, *args, steps=4, warmup=3).record
    assert r["device"] == "cuda" and r["syncs_per_step"] == pytest.approx(syncs)
    assert r["syncs_per_step_cuda_debug"] == pytest.approx(syncs)  # no torch.cuda.synchronize() in these scripts


def test_compare_of_two_traces_blames_a_line_added_above_a_sync_not_the_sync_it_moved(tmp_path, monkeypatch, capsys):
    """The issue's case on real traces: a new `.item()` above an existing one moves the old line down; compare names
    the new line, with its code, and not the old one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.cli, "_report", lambda paths: True)
    path = tiny(tmp_path, setup="running = 0.0", after="running += loss.item()")
    options = ["trace", "--steps", "3", "--warmup", "1"]
    assert main([*options, "--out", "base", "train.py"]) == 0
    path.write_text(path.read_text().replace("    running += loss.item()\n",
                                             "    norm = loss.item()\n    running += loss.item()\n"))
    assert main([*options, "--out", "new", "train.py"]) == 0
    capsys.readouterr()
    assert main(["compare", "base", "new", "--only-deterministic"]) == 1
    out = capsys.readouterr().out
    added, moved = line_of(path, "norm = loss.item()"), line_of(path, "running += loss.item()")
    assert f"(+1/step at train.py:{added} `norm = loss.item()`)" in out and f"train.py:{moved}" not in out


def test_a_traced_scripts_sites_are_relative_to_its_directory_wherever_it_is_started(tmp_path, monkeypatch):
    """The same script traced from its directory and from elsewhere names the same sites, relative to the script's
    directory (`compare` sees no "+1" and "-1 (gone)"); a module next to it reads as its module's path, and a sync in
    an installed package names the script's line that reached it, with both lines' code in the summary."""
    project, packages = tmp_path / "project", tmp_path / "venv" / "site-packages"
    (packages / "fakefw").mkdir(parents=True)
    (packages / "fakefw" / "__init__.py").write_text("def log(loss):\n    return loss.item()\n")
    project.mkdir()
    (project / "steplog.py").write_text("def log(loss):\n    return loss.item()\n")
    monkeypatch.syspath_prepend(str(packages))
    for name in ("fakefw", "steplog"):  # the modules the script imports are its own, not an earlier test's
        monkeypatch.delitem(sys.modules, name, raising=False)
    path = tiny(project, setup="import fakefw\nimport steplog", after="steplog.log(loss)\nfakefw.log(loss)")
    seen = []
    for cwd in (project, tmp_path):
        monkeypatch.chdir(cwd)
        record = traced(path, steps=2).record
        seen.append(sorted(record["sync_sites"]))
    library = f"<site-packages>/fakefw/__init__.py:2 from train.py:{line_of(path, 'fakefw.log(loss)')}"
    assert seen[0] == seen[1] == sorted([f"train.py:{line_of(path, 'x.to(device)')}", "steplog.py:2", library])
    assert "return loss.item() from fakefw.log(loss)" in trace.summary(record)


def test_a_compiled_model_is_measured_without_the_compilers_tensors_or_its_compile_time(tmp_path):
    """torch.compile keeps FakeTensors (no memory, nominal sizes) in its caches: the traced peak memory of a compiled
    MLP is within 2x of the same script's eager peak (before: 3x with aot_eager, 760x with a cold inductor cache). A
    compilation that falls in the time pass (here the script compiles at iteration 5, the time pass's first step) is
    left out of the step time, with a note."""
    eager = tiny(tmp_path, name="eager.py").read_text()
    compiled = eager.replace("optimizer = torch.optim.SGD(", "model = torch.compile(model, backend='aot_eager')\n"
                                                             "optimizer = torch.optim.SGD(")
    (tmp_path / "compiled.py").write_text(compiled)
    peaks = {name: traced(tmp_path / name, steps=2, warmup=1).record["peak_memory_bytes"]
             for name in ("eager.py", "compiled.py")}
    assert peaks["compiled.py"] <= 2 * peaks["eager.py"], peaks
    late = tiny(tmp_path, name="late.py", before="""
        if step == 5:
            model = torch.compile(model, backend="eager")
        """)
    r = traced(late, steps=2, warmup=1).record
    assert len(r["step_times_s"]) == 1 and any("compiled (torch.compile" in n for n in r["trace_notes"]), r


def test_the_time_pass_says_whether_the_machine_was_busy(tmp_path):
    """The time pass is watched as `run`'s timed blocks are (`bench.timing.LoadWatch`, read before and after the pass,
    never inside a step): the record carries its readings and a `reliability`, and a busy machine's step time is
    flagged in the summary."""
    r = traced(tiny(tmp_path), steps=3, warmup=1).record
    [load] = r["block_load"]
    assert load["wall_s"] > 0 and load["threads"] == torch.get_num_threads()
    assert r["reliability"] == "ok" or r["reliability"].startswith("unreliable: ")  # the machine as it is now
    busy = {**load, "wait_s": load["wall_s"]}  # its threads waited for a CPU all the pass long
    flagged = {**r, "block_load": [busy], "reliability": stats.reliability([busy], "cpu")}
    assert "? a busy machine: its threads waited for a CPU for up to 100%" in trace.summary(flagged)
    assert "a busy machine" not in trace.summary({**r, "reliability": "ok"})
