"""Distributed cells (the ddp_* variants) under torchrun: 2 ranks with gloo on the CPU, as `loopmark run
--nproc-per-node 2` starts them; a rank that crashes or hangs; and what runs without a process group."""

import os
from pathlib import Path

import pytest
import torch

from bench.cli import main
from loops import Idioms, TrainLoop, builtin_names, resolve_variant, resolve_workload
from reports import results

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--device", "cpu", "--steps", "3", "--repeats", "1", "--warmup", "2"]


def left_behind(marker: str) -> list[str]:
    """Processes whose command line names `marker` (an --out directory of one test)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(cmdline)
    return found


def test_distributed_run_gives_every_verdict_and_counts_collectives(cli, tmp_path):
    """Every built-in ddp variant gets its declared verdict with 2 ranks; collectives/step show that no_sync around
    backward() alone all-reduces every micro-batch; per-rank figures are kept; and `compare` fails a loop that
    all-reduces once more per step, naming the line."""
    out = tmp_path / "run"
    done = cli("run", "--nproc-per-node", "2", *SMALL, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    env, records = results.read_results(out)
    assert env["ranks"] == 2 and env["backend"] == "gloo" and env["flight_recorder"] == "off"
    assert env["command"].startswith("loopmark run --nproc-per-node 2")  # what was typed, not the ranks' command
    cells = {r["variant"]: r for r in records}
    assert set(cells) == set(builtin_names("ddp"))
    for r in records:
        assert r["status"] == "ok" and r["verdict_as_expected"], (r["variant"], r["verdict"], r["verdict_reason"])
        assert r["ranks"] == 2 and r["batch_size"] == 2 * resolve_workload("mlp").batch_size
        assert len(r["rank_syncs_per_step"]) == 2 and len(r["rank_peak_memory_bytes"]) == 2
        # c10d's flight recorder, whose ring buffer fills for 2000 collectives, is off: no loop here grows memory
        assert r["memory_growth_class"] != "leak", (r["variant"], r["memory_growth_bytes_per_step"])
    accumulate = resolve_variant("ddp_grad_accum_no_sync")
    k = Idioms(accumulate=2).accumulate
    assert accumulate.description.startswith(f"{k} micro-batches")
    assert cells["ddp_grad_accum_no_sync"]["collectives_per_step"] * k == \
        cells["ddp_no_sync_backward_only"]["collectives_per_step"] == 2
    assert cells["ddp_baseline"]["collectives_per_step"] == 1
    assert cells["ddp_find_unused_parameters"]["collectives_per_step"] == 2  # the used-parameter map, every step
    assert cells["ddp_loss_allreduce_per_step"]["collectives_per_step"] == 2
    assert "ranks' parameters differ after step 1" in cells["ddp_no_sync_off_by_one"]["verdict_reason"]
    assert "epoch 2 drew the same samples in the same order as epoch 1" in \
        cells["ddp_missing_set_epoch"]["verdict_reason"]
    assert "ddp" in done.stdout and "collectives" in done.stdout  # the summary's column

    planted = tmp_path / "planted"
    done = cli("run", "--nproc-per-node", "2", *SMALL, "--out", str(planted), "--variant", "ddp_baseline",
                    "--workload", "tests.distributed_loops:mlp_with_extra_all_reduce")
    assert done.returncode == 0, done.stderr[-3000:]
    compared = cli("compare", str(out), str(planted), "--only-deterministic")
    assert compared.returncode == 1, compared.stdout
    assert "collectives/step changed: 1 -> 2" in compared.stdout
    assert "tests/distributed_loops.py" in compared.stdout


def test_a_crashed_or_hung_rank_faults_its_cell_alone(cli, tmp_path):
    """A rank killed mid-cell gives that cell `error` naming the rank; a rank stuck where no signal reaches it gives
    `timeout` naming where it stopped; the cells before and after are measured, and no process is left."""
    out = tmp_path / "faults"
    done = cli("run", "--nproc-per-node", "2", *SMALL, "--cell-timeout", "4", "--out", str(out),
                    "--variant", "tests.distributed_loops:crash_on_rank_1",
                    "--variant", "tests.distributed_loops:stuck_on_rank_1", "--variant", "ddp_static_graph",
                    "--variant", "tests.distributed_loops:tutorial_epoch")
    assert done.returncode == 0, done.stderr[-3000:]
    cells = {r["variant"]: r for r in results.read_results(out)[1]}
    crashed, stuck = cells["tests.distributed_loops:crash_on_rank_1"], cells["tests.distributed_loops:stuck_on_rank_1"]
    assert crashed["status"] == "error" and crashed["error"].startswith("rank 1 ended (killed by SIGKILL)")
    assert stuck["status"] == "timeout"
    assert "rank 1 stopped at tests/distributed_loops.py" in stuck["error"] and "stuck_on_rank_1" in stuck["error"]
    for name in ("ddp_baseline", "ddp_static_graph"):
        assert cells[name]["status"] == "ok" and cells[name]["verdict_as_expected"], cells[name]
    # a tutorial's loop (a peek at the first batch, an unguarded sampler.set_epoch, its own loss function) runs in
    # every pass, and its own loss is judged against the ranks' mean gradient
    tutorial = cells["tests.distributed_loops:tutorial_epoch"]
    assert tutorial["status"] == "ok" and tutorial["verdict"] in ("identical", "equivalent"), tutorial
    assert tutorial["collectives_per_step"] == 1
    assert left_behind(str(out)) == []


def test_check_names_the_rank_whose_loop_raised(cli):
    """`check` with a loop that raises on one rank ends every rank and says which, rather than waiting for it."""
    done = cli("check", "--nproc-per-node", "2", "--variant", "tests.distributed_loops:raises_on_rank_1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rank 1" in done.stdout + done.stderr and "only rank 1 fails" in done.stdout + done.stderr


def test_check_ends_a_rank_hung_in_a_collective_at_its_time_limit(cli):
    """`check --nproc-per-node 2` with rank 1 stuck where no signal reaches it: the launcher ends every rank after the
    cell's limit and as much again, exit 1, naming the cell and where rank 1 stopped (not gloo's 30-minute wait)."""
    done = cli("check", "--nproc-per-node", "2", "--variant", "tests.distributed_loops:stuck_on_rank_1",
               "--cell-timeout", "3")
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "timeout: " in text and "stuck_on_rank_1" in text and "no progress in 6 s" in text, text
    assert "rank 1 stopped at tests/distributed_loops.py" in text and "at None" not in text, text


def test_distributed_variants_need_ranks_and_ranks_need_distributed_variants(tmp_path, capsys):
    """Asking for a ddp variant without --nproc-per-node, or a one-process variant with it: one line, exit 2, before
    any process starts (so in this one: a traceback would be an exception here)."""
    assert main(["run", "--variant", "ddp_baseline", "--quick", "--out", str(tmp_path / "a")]) == 2
    alone = capsys.readouterr().err
    assert "--nproc-per-node" in alone and len(alone.strip().splitlines()) == 1 and "Traceback" not in alone
    assert main(["run", "--nproc-per-node", "2", "--variant", "tensor_sum", "--out", str(tmp_path / "b")]) == 2
    mixed = capsys.readouterr().err
    assert "runs in one process" in mixed and len(mixed.strip().splitlines()) == 1 and "Traceback" not in mixed
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_no_sync_needs_ddp():
    """A loop asked to skip DDP's all-reduce on a model DDP does not wrap says so, rather than silently syncing."""
    loop = TrainLoop(Idioms(accumulate=2, no_sync="forward_and_backward"), torch.nn.Linear(4, 2),
                     torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1), torch.device("cpu"))
    model = torch.nn.Linear(4, 2)
    run = __import__("loops").Run(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                                  [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))], torch.device("cpu"))
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        loop(run)


def test_compositions_under_ddp_expect_the_idiom_verdict():
    """ddp_baseline+IDIOM is IDIOM under DDP, judged against ddp_baseline: it expects what IDIOM expects."""
    assert resolve_variant("ddp_baseline+zero_grad_missing").expected_for("mlp") == "broken"
    assert resolve_variant("ddp_baseline+tensor_sum").expected_for("cnn") == "equivalent"
    assert resolve_variant("ddp_baseline+tensor_sum").kind == "ddp"
    assert resolve_variant("ddp_find_unused_parameters+ddp_static_graph").ddp == {"find_unused_parameters": True,
                                                                                  "static_graph": True}


def test_the_pytest_fixture_measures_a_distributed_cell(measured_once, pytester):
    """`loopmark.measure(..., "ddp_baseline")` in a user's test suite runs its ranks under torchrun and returns the
    cell like any other, collectives and per-rank figures included (the user's session runs in this process, as
    tests/test_pytest_plugin.py runs its own; the ranks are torchrun's)."""
    pytester.makepyfile(test_ddp_user=
        "def test_ddp(loopmark):\n"
        "    result = loopmark.measure('mlp', 'ddp_grad_accum_no_sync', steps=3, repeats=1, warmup=2)\n"
        "    loopmark.assert_correct(result)\n"
        "    assert result.collectives_per_step == 1 and result.ranks == 2\n"
        "    assert len(result.rank_syncs_per_step) == 2\n")
    done = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark")
    done.assert_outcomes(passed=1)


def test_a_bug_that_needs_two_ranks_expects_no_bug_on_one():
    """With one rank nothing can diverge: the off-by-one no_sync expects `equivalent` there, `broken` with two."""
    v = resolve_variant("ddp_no_sync_off_by_one")
    assert (v.expected_for("mlp", 1), v.expected_for("mlp", 2)) == ("equivalent", "broken")
    assert resolve_variant("ddp_no_sync_off_by_one+zero_grad_missing").expected_for("mlp", 1) == "broken"


def test_the_launchers_ranks_get_every_variable_torchrun_gives_a_rank():
    """`bench.launcher` gives each rank what torch's own agent puts in a worker's environment (read from the installed
    torch's source, so a torch that adds one fails here), with the values of a one-node job."""
    import inspect
    import re

    from torch.distributed.elastic.agent.server import local_elastic_agent

    from bench.launcher import rank_env

    source = inspect.getsource(local_elastic_agent.LocalElasticAgent._start_workers)
    block = source[source.index("worker_env = {"):]
    torchrun = set(re.findall(r'^\s*"([A-Z_]+)":', block[:block.index("}")], re.M)) | {"LOCAL_RANK"}
    assert {"RANK", "WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} <= torchrun
    env = rank_env(1, 2, 29500)
    assert torchrun <= set(env), torchrun - set(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"]) == \
        ("1", "1", "2", "2", "0")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")


def test_the_ranks_are_forked_on_a_cpu_machine_and_torchruns_elsewhere(monkeypatch):
    """One machine without a GPU: `bench.launcher`; with a GPU, or torchrun's rendezvous options: torchrun."""
    from bench import launcher

    monkeypatch.setattr(launcher, "gpu_present", lambda: False)
    assert launcher.ranks_command(2, ["run"])[1:] == ["-m", "bench.launcher", "2", "run"]
    assert launcher.ranks_command(2, ["trace"], ["--nnodes=2"])[1:] == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2", "-m", "bench", "trace"]
    monkeypatch.setattr(launcher, "gpu_present", lambda: True)
    assert launcher.ranks_command(2, ["check"])[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bench", "check"]
