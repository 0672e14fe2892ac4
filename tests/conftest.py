import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# `pytester` runs a small pytest session of its own (tests/test_pytest_benchmark_report.py)
pytest_plugins = ["pytester"]

# One intra-op thread: the tests' tensors are tiny, and on a small machine shared with other work two spinning
# OpenMP threads make every operator many times slower. Verdicts compare runs made under the same setting.
torch.set_num_threads(1)

# A test process with a thread of its own cannot fork the ranks' launcher (`bench.launcher._forkable`: it starts
# `python -m bench.launcher` instead) nor `check --jobs`'s workers. Two kinds of thread outlive a compile test: the
# compiler's pool of C++ compile threads (one thread here: it compiles in the test's own thread, and the workers share
# the cores already) and tqdm's monitor thread, which its progress bars start.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
try:
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:
    pass

MAX_WORKERS = 4
ROOT = Path(__file__).resolve().parents[1]


# options under which pytest-benchmark must time (it times nothing under xdist)
BENCHMARKING = ("benchmark_only", "benchmark_json", "benchmark_save", "benchmark_autosave", "benchmark_compare")


@pytest.fixture(scope="session")
def measured_once():
    """One cell measured in this process before a `pytester` session runs in it (request it in such tests). A cell's
    first measurement imports hundreds of modules (the profiler, dynamo, libraries torch registers in C++); an
    in-process session would import them and unload them as it ends, and torch refuses to register a library twice
    when they are imported again ("Only a single TORCH_LIBRARY can be used to register the namespace")."""
    from bench import runner
    from bench.cell import stage_batches
    from loops import resolve_variant, resolve_workload

    workload, device = resolve_workload("loops.example_user:regression"), torch.device("cpu")
    settings = runner.Settings(steps=3, repeats=1, warmup=1, memory_steps=3, check_steps=2, cell_timeout=0)
    runner.untimed_passes(workload, resolve_variant("baseline"), device, settings,
                          stage_batches(workload, "train", 3, device), {})


@pytest.fixture
def cli(capsys, monkeypatch):
    """`cli(*ARGS)`: `loopmark ARGS` run in this process, as `bench.cli.main`, from the repository's root (where the
    ranks it starts import `tests.distributed_loops`): (exit status, stdout, stderr) as a finished process's. The
    ranks of `--nproc-per-node N` are forked from this process, which has imported torch already (`bench.launcher`);
    a launching process of its own would import torch once more for nothing (and `loopmark`, the name, is the pytest
    plugin's fixture)."""
    from bench.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with monkeypatch.context() as typed:
            typed.setattr(sys, "argv", ["loopmark", *args])  # what the results record as the command typed
            code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["loopmark", *args], code, out, err)
    return run


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml's addopts) means one worker per core, up to MAX_WORKERS, each test on one thread;
    none when benchmarks are to be timed or saved (`--benchmark-only`, `--benchmark-json`, ...) or with `--pdb`."""
    if any(config.getoption(name, None) for name in BENCHMARKING) or config.getoption("usepdb", False):
        return 0
    return min(os.cpu_count() or 1, MAX_WORKERS)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on a machine without an NVIDIA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
