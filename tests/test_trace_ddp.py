"""`loopmark trace` of a DDP script under torchrun: every rank traced, a cell per rank in one results directory.

tests/ddp_trace_script.py is written as the PyTorch DDP tutorial writes one (`device_ids=[local_rank]` when CUDA,
nccl on a GPU): traced without a GPU it sees CUDA, so the tracer must run its nccl on gloo and give DDP the stand-in
module without device ids. Its docstring works out its collectives and syncs per step; each case is one torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ddp_trace_script.py"
FAULTY = ROOT / "tests" / "ddp_fault_script.py"
ACCELERATED = ROOT / "tests" / "accelerate_trace_script.py"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def traced(out: Path, *argv: str, launcher: str, warmup: int = 2, cli=None) -> subprocess.CompletedProcess:
    """`loopmark trace --nproc-per-node 2 ...` typed (launcher "typed"), or run in this process by the `cli` fixture
    ("here": the ranks forked from this process, which imported torch already), or the user's own `torchrun ... -m
    bench trace ...` ("torchrun")."""
    options = ["--steps", "2", "--warmup", str(warmup), "--out", str(out)]
    if launcher == "here":
        return cli("trace", "--nproc-per-node", "2", *options, *argv)
    start = ["-m", "bench", "trace", "--nproc-per-node", "2"] if launcher == "typed" else [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bench", "trace"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *start, *options, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize(("micro_batches", "no_sync", "collectives", "verdict", "launcher", "more"), [
    # one all-reduce per backward pass; the user's own torchrun command
    (1, "none", 1, "consistent", "torchrun", []),
    # no_sync on the first micro-batch: one all-reduce, after the last; `loopmark trace` as typed in a shell (the
    # other cases: run in this process)
    (2, "first", 1, "consistent", "typed", []),
    (2, "backward", 2, "consistent", "here", []),  # no_sync around backward() only: DDP all-reduces both (a no-op)
    (2, "last", 1, "broken", "here", []),  # the last micro-batch not synced: the ranks' parameters part after step 1
    # nanoGPT's require_backward_grad_sync on the last micro-batch: one all-reduce; epochs of 2 steps, each given
    # set_epoch: no epoch repeats the one before
    (2, "flag", 1, "consistent", "here", ["--samples", "32"]),
    # epochs of 4 steps and no set_epoch: the second epoch (steps 5 to 8, in the audit and time passes) reads the
    # first one's order
    (1, "none", 1, "different", "here", ["--samples", "32", "--no-set-epoch"]),
])
def test_each_rank_of_a_ddp_script_is_traced(tmp_path, cli, micro_batches, no_sync, collectives, verdict, launcher,
                                             more):
    """Each rank's cell counts its all-reduces per step and 2 blocking copies per micro-batch; its verdict is the
    audit's, broken when the ranks' parameters differ after a step, different when a shuffling DistributedSampler
    reads an epoch in the order of the one before. Only rank 0 writes; `--strict` fails a broken verdict through the
    launcher (not a different one)."""
    out = tmp_path / "out"
    strict = ["--strict"] if launcher != "torchrun" else []
    done = traced(out, *strict, str(SCRIPT), "--micro-batches", str(micro_batches), "--no-sync", no_sync, *more,
                  launcher=launcher, cli=cli)
    assert done.returncode == (1 if verdict == "broken" else 0), done.stdout + done.stderr
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [(c["workload"], c["rank"], c["ranks"]) for c in cells] == [
        (f"{SCRIPT.name} rank {r}", r, 2) for r in range(2)]
    for c in cells:
        assert (c["status"], c["verdict"]) == ("ok", verdict), c["verdict_reason"]
        assert c["collectives_by_step"] == [collectives] * 2 and c["collective_ops"] == {"allreduce_": collectives}
        assert c["syncs_by_step"] == [2 * micro_batches] * 2 and c["comm_bytes_per_step"] == 72 * collectives
        assert all(site.startswith((f"{SCRIPT}:", "tests/ddp_trace_script.py:")) for site in c["collective_sites"])
        assert "init_process_group('nccl') ran on gloo" in c["trace_notes"][0]
    if verdict == "different":
        assert all(c["verdict_reason"].startswith("the DistributedSampler of the TensorDataset was never given "
                                                  "set_epoch: every epoch reads the same order (its epoch 2, at step "
                                                  "5,") for c in cells)
    if verdict == "broken":
        assert "parameters differ from rank" in cells[0]["verdict_reason"]
        assert "loopmark trace --strict: ddp_trace_script.py rank 0: verdict broken" in done.stdout + done.stderr
    assert done.stdout.count("trace of ddp_trace_script.py rank 0") == 1 and "\nranks:\n" in done.stdout
    assert (out / "report.md").exists()


def test_a_rendezvous_option_without_ranks_is_one_line_and_exit_2(capsys):
    from bench.cli import main

    assert main(["trace", "--nnodes", "2", str(SCRIPT)]) == 2
    err = capsys.readouterr().err
    assert "--nnodes is a torchrun option: it goes with --nproc-per-node N" in err and len(err.splitlines()) == 1


def _line_of(text: str, path: Path = FAULTY) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(("fault", "named"), [
    ("raise", "loopmark trace: rank 1 failed: the script raised ValueError: rank 1 gave up at step 4 "
              "(tests/ddp_fault_script.py:{raise ValueError} in main); rank(s) 0 ended in the collective that waited "
              "for it"),
    # rank 0 waits in DDP's all-reduce: its process group's timeout (3 s) ends it, the launcher the sleeping rank 1
    ("hang", "loopmark trace: timeout: no step on any rank in 6 s (--cell-timeout and as much again, a minute at "
             "most): rank 1 stopped at tests/ddp_fault_script.py:{time.sleep(3600)} in main; rank 0 at 'its trace "
             "ended: waiting for the other ranks' records'"),
    ("kill", "loopmark trace: rank 1 ended (killed by SIGKILL)"),
])
def test_a_rank_that_fails_ends_every_rank_is_named_and_the_others_measurements_are_kept(tmp_path, cli, fault,
                                                                                         named):
    """Rank 1 of tests/ddp_fault_script.py fails at its step 4, the first of the audit pass (1 warm-up step, 2 counted):
    the trace exits 1 within about --cell-timeout, one line names the rank (and where it stopped), and rank 0's cell
    is written with its count pass (2 all-reduces in step 3; DDP rebuilds its bucket in step 2)."""
    out = tmp_path / "out"
    done = traced(out, "--cell-timeout", "3", str(FAULTY), "--fault", fault, "--at-step", "4",
                  launcher="here", warmup=1, cli=cli)
    assert done.returncode == 1, done.stdout + done.stderr
    for code in ("raise ValueError", "time.sleep(3600)"):
        named = named.replace("{" + code + "}", str(_line_of(code)))
    said = (done.stdout + done.stderr).splitlines()  # what rank 0 says comes through the launcher's stdout
    assert [line for line in said if "rank 1" in line and line.startswith("loopmark trace:")] == [named], said
    cells = {c["rank"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == ({0, 1} if fault == "raise" else {0})
    assert cells[0]["status"] == "error" and cells[0]["trace_passes"]["count"] == 2
    assert cells[0]["collectives_by_step"][1] == 2 and "rank 1" not in cells[0]["error"]


def test_rendezvous_options_go_to_torchrun_in_place_of_standalone(monkeypatch, tmp_path):
    """`--nnodes`, `--node-rank` and `--rdzv-*` are torchrun's: they replace `--standalone` on its command line, before
    `-m bench trace`, which gets loopmark's own options and the script's (no torchrun is started here)."""
    from bench import launcher
    from bench.cli import main

    seen = []
    monkeypatch.setattr(launcher, "_one_torchrun", lambda cmd, *a, **k: (seen.append(cmd), (0, None, None, ""))[1])
    main(["trace", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
          "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "job7", "--steps", "3", "--out", str(tmp_path / "out"),
          str(SCRIPT), "--micro-batches", "2"])
    cmd = seen[0]
    start = cmd.index("torch.distributed.run") + 1
    assert cmd[start:cmd.index("bench")] == [
        "--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=job7",
        "--nproc-per-node=2", "-m"]
    assert cmd[cmd.index("bench") + 1:] == ["trace", "--out", str(tmp_path / "out"), "--overwrite", "--steps", "3",
                                             str(SCRIPT), "--micro-batches", "2"]


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs Hugging Face Accelerate")
@pytest.mark.parametrize("launch", ["accelerate", "loopmark"])
def test_accelerate_launch_of_bench_trace(tmp_path, launch):
    """`accelerate launch --multi_gpu --num_processes 2 -m bench trace SCRIPT.py` (Accelerate starts the ranks through
    torchrun, on a machine without a GPU too), or `loopmark trace --nproc-per-node 2 SCRIPT.py` (its forked ranks,
    which Accelerate takes for torchrun's): each rank traces an Accelerate script (`prepare`,
    `accelerator.backward`): 1 all-reduce of 72 bytes and 2 blocking copies (the prepared loader's) per step,
    consistent, a cell per rank."""
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "bench",
             "trace"] if launch == "accelerate" else ["-m", "bench", "trace", "--nproc-per-node", "2"]
    options = ["--steps", "2", "--warmup", "2", "--out", str(out), str(ACCELERATED)]
    done = subprocess.run([sys.executable, *start, *options], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [(c["workload"], c["rank"], c["ranks"]) for c in cells] == [
        (f"{ACCELERATED.name} rank {r}", r, 2) for r in range(2)]
    for c in cells:
        assert (c["status"], c["verdict"]) == ("ok", "consistent"), c["verdict_reason"]
        assert c["collectives_by_step"] == [1, 1] and c["comm_bytes_per_step"] == 72 and c["syncs_by_step"] == [2, 2]
