import os

import pytest
import torch

# `pytester` runs a small pytest session of its own (tests/test_pytest_benchmark_report.py)
pytest_plugins = ["pytester"]

# One intra-op thread: the tests' tensors are tiny, and on a small machine shared with other work two spinning
# OpenMP threads make every operator many times slower. Verdicts compare runs made under the same setting.
torch.set_num_threads(1)

MAX_WORKERS = 4


# options under which pytest-benchmark must time (it times nothing under xdist)
BENCHMARKING = ("benchmark_only", "benchmark_json", "benchmark_save", "benchmark_autosave", "benchmark_compare")


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
