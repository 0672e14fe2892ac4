"""Every registered cell as a pytest-benchmark benchmark.

Parametrized over the registry (the default matrix of `loopmark run`: training variants on mlp and cnn,
evaluation variants on cnn; the idioms beyond the seed on mlp), so a new variant is benchmarked without
touching this file. One round is one block of STEPS_PER_ROUND steps of the variant's own loop; on CUDA the
target ends with one synchronize, so the benchmark's timer never stops before the device is done. The
untimed passes (correctness, syncs, memory) run before timing and travel in `extra_info["loopmark"]`, so
`--benchmark-json` holds every metric and `loopmark report out.json` renders it.

    pytest tests/test_benchmarks.py --benchmark-only --benchmark-json out.json && loopmark report out.json
"""

import pytest
import torch

from bench import runner
from bench.cell import build_cell, stage_batches
from loops import builtin_names, resolve_variant, resolve_workload, verdict_matches

STEPS_PER_ROUND = 4
CELLS = [(w, v) for kind, workloads in (("train", runner.DEFAULT_TRAIN_WORKLOADS),
                                        ("eval", runner.DEFAULT_EVAL_WORKLOADS))
         for w in workloads for v in builtin_names(kind, extended=False)]
CELLS += [("mlp", v) for v in builtin_names("train") if v not in builtin_names("train", extended=False)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_workloads: dict = {}
_caches: dict = {}


@pytest.mark.parametrize("workload,variant", CELLS, ids=[f"{w}-{v}" for w, v in CELLS])
def test_cell(benchmark, request, workload, variant):
    full = request.config.getoption("benchmark_only")
    settings = runner.Settings(steps=STEPS_PER_ROUND, repeats=20 if full else 2, warmup=3, check_steps=3,
                               memory_steps=16)
    wl = _workloads.setdefault(workload, resolve_workload(workload))
    v = resolve_variant(variant)
    if v.requires == "cuda" and DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    staged = stage_batches(wl, "test" if v.kind == "eval" else "train", STEPS_PER_ROUND, DEVICE)
    record = runner.base_record(wl, v, DEVICE, settings)
    record.update(runner.untimed_passes(wl, v, DEVICE, settings, staged, _caches.setdefault(workload, {})))
    record["steps_per_round"] = STEPS_PER_ROUND
    record.pop("memory_trace_bytes", None)
    benchmark.extra_info["loopmark"] = record

    cell = build_cell(wl, v, DEVICE)
    cell.epoch(staged[:settings.warmup])

    def block():
        cell.epoch(staged)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(block, rounds=settings.repeats, iterations=1, warmup_rounds=1)
    assert verdict_matches(record["verdict"], record["expected_verdict"]), record["verdict_reason"]
