"""Every registered cell as a pytest-benchmark benchmark.

Parametrized over the registry (the default matrix of `loopmark run`: training variants on mlp and cnn,
evaluation variants on cnn; the idioms beyond the seed on mlp), so a new variant is benchmarked without
touching this file. One round is one block of `steps_per_round` steps of the variant's own loop, timed as the
pytest plugin's `loopmark` fixture times it (bench/pytest_plugin.py): on CUDA the block ends with one synchronize,
so the benchmark's timer never stops before the device is done. The untimed passes (correctness, syncs, memory) run
before timing and travel in `extra_info["loopmark"]` with loopmark's per-step times of the timed blocks, so
`--benchmark-json` holds every metric, `loopmark report out.json` renders it and `loopmark compare` gates two of
them.

    pytest tests/test_benchmarks.py --benchmark-only --benchmark-json out.json && loopmark report out.json

`--benchmark-only` benchmarks every cell for 20 rounds of 4 steps, in one process (tests/conftest.py). Plain
`pytest` runs a representative subset (SMOKE_CELLS) for one round of 3 steps (untimed under xdist), so that the
suite stays fast: every variant's verdict is checked on every workload by tests/test_verdicts.py, syncs and memory
by tests/test_witnesses.py, and a real `--benchmark-json` file by tests/test_pytest_benchmark_report.py.
"""

import pytest
import torch

from bench import runner
from bench.cell import stage_batches
from bench.pytest_plugin import alone_record, time_with_benchmark
from loops import builtin_names, resolve_variant, resolve_workload, verdict_matches
from reports import results

CELLS = [(w, v) for kind, workloads in (("train", runner.DEFAULT_TRAIN_WORKLOADS),
                                        ("eval", runner.DEFAULT_EVAL_WORKLOADS))
         for w in workloads for v in builtin_names(kind, extended=False)]
CELLS += [("mlp", v) for v in builtin_names("train") if v not in builtin_names("train", extended=False)]
# training and evaluation, both default workloads, a correct and a broken loss tracking, a broken zero_grad, one
# idiom beyond the seed
SMOKE_CELLS = [("mlp", "baseline"), ("mlp", "tensor_sum"), ("mlp", "graph_sum"), ("mlp", "zero_grad_missing"),
               ("cnn", "baseline"), ("cnn", "eval_baseline"), ("mlp", "train_acc_tensor")]
FULL = runner.Settings(steps=4, repeats=20, warmup=3, check_steps=3, memory_steps=16)
SMOKE = runner.Settings(steps=3, repeats=1, warmup=1, check_steps=2, memory_steps=6)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_workloads: dict = {}
_caches: dict = {}


def pytest_generate_tests(metafunc):
    if metafunc.function is test_cell:
        cells = CELLS if metafunc.config.getoption("benchmark_only") else SMOKE_CELLS
        metafunc.parametrize("workload,variant", cells, ids=[f"{w}-{v}" for w, v in cells])


def benchmark_cell(benchmark, workload: str, variant: str, settings: runner.Settings, warmup_rounds: int = 1):
    """Benchmark one cell as the pytest plugin's `loopmark` fixture does: its untimed passes, then `settings.repeats`
    rounds of one block of `settings.steps` steps each, timed by pytest-benchmark (`time_with_benchmark`); the record,
    with loopmark's per-step times of those very blocks, in `extra_info["loopmark"]`. Returns the cell's record."""
    wl = _workloads.setdefault(workload, resolve_workload(workload))
    v = resolve_variant(variant)
    if v.requires == "cuda" and DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    staged = stage_batches(wl, "test" if v.kind == "eval" else "train", settings.steps, DEVICE)
    m = results.Measurement(figures=runner.untimed_passes(wl, v, DEVICE, settings, staged,
                                                          _caches.setdefault(workload, {})))
    time_with_benchmark(benchmark, wl, v, DEVICE, settings, staged, m, warmup_rounds)
    record = alone_record(runner.cell_spec(wl, v, DEVICE, settings), m, settings.seed)
    benchmark.extra_info["loopmark"] = results._clean({**record, "steps_per_round": settings.steps})
    return record


def test_cell(benchmark, request, workload, variant):
    """A cell benchmarks, carries its loopmark record, and its verdict is the one its variant declares."""
    full = request.config.getoption("benchmark_only")
    record = benchmark_cell(benchmark, workload, variant, FULL if full else SMOKE, warmup_rounds=1 if full else 0)
    assert verdict_matches(record["verdict"], record["expected_verdict"]), record["verdict_reason"]


def test_smoke_cells_are_registered_cells():
    """The default subset names cells of the full matrix, so it follows the registry."""
    assert set(SMOKE_CELLS) <= set(CELLS)
