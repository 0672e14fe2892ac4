"""The harness's sync and memory passes on CPU agree with what REFERENCE-level facts say they must."""

import gc
import inspect
import os

import numpy as np
import pytest
import torch

import loops
from bench.cell import build_cell, stage_batches
from bench.memory import measure_memory
from bench.syncs import measure_syncs
from loops import canonical, resolve_variant, resolve_workload

CPU = torch.device("cpu")
STEPS = 8
GROWING = 1024  # bytes per step: far above the allocator's noise, far below one step of a retained graph
MEMORY_STEPS = 24


def _cell(workload, variant, steps=STEPS):
    wl = resolve_workload(workload)
    v = resolve_variant(variant)
    staged = stage_batches(wl, "test" if v.kind == "eval" else "train", steps, CPU)
    cell = build_cell(wl, v, CPU)
    cell.epoch(staged[:2])  # warm-up: the optimizer's state exists before counting
    return cell, staged


@pytest.mark.parametrize("workload,variant,expected", [
    ("mlp", "baseline", 1.0),
    ("digits", "baseline", 1.0),  # Adam: its .item() on the host-side step counter is not a sync
    ("conditional", "baseline", 1.0),
    ("mlp", "item_list_mean", 1.0),
    ("mlp", "tensor_sum", 1 / STEPS),
    ("mlp", "tensor_list_stack", 1 / STEPS),
    ("mlp", "tensor_list_totensor", 1.0),  # one per element, all at the end
    ("mlp", "graph_sum", 0.0),
    ("cnn", "eval_baseline", 2.0),
    ("cnn", "eval_inference_mode", 2.0),
    ("cnn", "eval_tensor_accum", 1 / STEPS),
    ("mlp", "tensor_sum+set_to_none_false", 1 / STEPS),
    # beyond the seed
    ("mlp", "train_acc_item", 2.0),
    ("mlp", "train_acc_tensor", 1 + 1 / STEPS),
    ("mlp", "input_pageable_w0", 3.0),  # two blocking host-to-device copies per step, then the .item()
    ("mlp", "input_pinned_w0", 1.0),  # non_blocking copies: no sync
    ("mlp", "d2h_nonblocking_unsynced", 0.0),  # no sync at all: that is the bug
    ("mlp", "grad_accum_2", 2.0),  # one .item() per micro-batch
    ("digits", "bf16_autocast", 1.0),
    ("digits", "optimizer_foreach", 1.0),
    ("digits", "optimizer_fused", 1.0),
])
def test_syncs_per_step(workload, variant, expected):
    """Each loop makes exactly the host-device syncs per step that its idiom implies (counted on the CPU stand-in)."""
    cell, staged = _cell(workload, variant)
    assert measure_syncs(cell, staged)["syncs_per_step"] == pytest.approx(expected)


@pytest.mark.parametrize("workload", ["mlp", "cnn"])
def test_set_to_none_false_costs_a_zero_per_parameter_tensor_without_foreach(workload):
    """zero_grad(set_to_none=False) dispatches one zero_() per parameter tensor with the for-loop optimizer,
    one _foreach_zero_ with the foreach or fused one."""
    def ops(variant):
        cell, staged = _cell(workload, variant)
        return measure_syncs(cell, staged)["ops_per_step"], sum(1 for _ in cell.model.parameters())

    (base, tensors), (keep, _) = ops("baseline"), ops("set_to_none_false")
    assert keep - base == tensors
    for impl in ("optimizer_foreach", "optimizer_fused"):
        assert ops(f"{impl}+set_to_none_false")[0] - ops(impl)[0] == 1


def _baseline_item_line() -> tuple[str, int]:
    """File and line of the baseline's per-step `.item()`, read from the source found through `loops`: the line of
    the baseline tracker's own Python code that calls `.item()`, or, where its read is `torch.Tensor.item` itself
    (no Python frame of its own), the training loop's line that calls that read."""
    tracking = canonical.LOSS_TRACKING[loops.Idioms().loss_tracking]
    code = getattr(tracking, "add", None) or getattr(tracking, "read", None)
    if inspect.isfunction(code):
        needle = ".item()"
    else:
        assert code is torch.Tensor.item, code
        code, needle = loops.TrainLoop.__call__, "read(loss)"
    lines, start = inspect.getsourcelines(code)
    found = [start + i for i, line in enumerate(lines) if needle in line.split("#")[0]]
    assert len(found) == 1, (needle, found)
    return os.path.realpath(inspect.getsourcefile(code)), found[0]


def test_sync_sites_name_the_loop_line():
    """The baseline's one sync per step is attributed to the exact file:line of its `.item()` call."""
    cell, staged = _cell("mlp", "baseline")
    sites = measure_syncs(cell, staged)["sync_sites"]
    (site, count), = sites.items()
    path, line = site.rsplit(":", 1)
    assert (os.path.realpath(path), int(line)) == _baseline_item_line()
    assert count == STEPS


def test_an_extra_item_per_step_is_counted():
    """The CI gate's witness: a user loop with one more .item() per step shows one more sync per step."""
    from bench.syncs import SyncCounter

    x = torch.ones(3)
    counter = SyncCounter(CPU)
    counter.track(x)
    with counter:
        y = (x * 2).sum()
        y.item()
        float(y)
        bool(y > 0)
        torch.tensor([y, y])
        y.tolist()
        z = torch.zeros(2)  # a host tensor: reading it is no sync
        z.sum().item()
    assert counter.syncs == 6


def _memory(workload, variant, steps=MEMORY_STEPS) -> dict:
    cell, staged = _cell(workload, variant, steps)
    gc.collect()  # garbage left by earlier tests, freed in the middle of the trace, reads as shrinking
    return measure_memory(cell, staged)


def _robust_slope(trace: list) -> float:
    """Theil-Sen slope (the median of the pairwise slopes) of a memory trace, from the end of the first step on as
    `slope_per_step` does: one large allocation or free between two steps does not move it."""
    y = np.asarray(trace[1:], dtype=np.float64)
    i, j = np.triu_indices(len(y), k=1)
    return float(np.median((y[j] - y[i]) / (j - i)))


def _graph_nodes(value) -> int:
    """Autograd nodes reachable from a reported value (a tensor or a tuple holding one)."""
    roots = [v.grad_fn for v in (value if isinstance(value, tuple) else (value,))
             if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    seen, stack = set(), roots
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("workload,variant,baseline", [("mlp", "graph_sum", "baseline"),
                                                       ("cnn", "eval_graph_sum", "eval_baseline")])
def test_retained_graph_grows_memory(workload, variant, baseline):
    """A loop that keeps every step's autograd graph grows the heap per step by far more than its baseline does
    (robust slopes of the memory pass's traces), and the graph it keeps grows by the same nodes every step."""
    grows, flat = _memory(workload, variant), _memory(workload, baseline)
    assert _robust_slope(grows["memory_trace_bytes"]) - _robust_slope(flat["memory_trace_bytes"]) > GROWING
    cell, staged = _cell(workload, variant, steps=12)
    nodes = [_graph_nodes(cell.epoch(staged[:n])) for n in (4, 8, 12)]
    assert nodes[2] - nodes[1] == nodes[1] - nodes[0] > 0, nodes


@pytest.mark.parametrize("workload,variant", [("mlp", "baseline"), ("cnn", "baseline"), ("cnn", "eval_baseline")])
def test_correct_loops_do_not_grow(workload, variant):
    """A correct loop's memory stays flat from step to step: no tensor outlives its step, and the heap's robust
    slope is far below a retained graph's; its peak holds at least the parameters."""
    cell, staged = _cell(workload, variant, steps=MEMORY_STEPS)
    gc.collect()
    record = measure_memory(cell, staged)
    assert abs(record["tensor_growth_bytes_per_step"]) < GROWING
    assert abs(_robust_slope(record["memory_trace_bytes"])) < GROWING
    assert record["peak_memory_bytes"] > sum(p.numel() * 4 for p in cell.model.parameters())


def test_a_non_blocking_copy_read_before_a_sync_is_flagged():
    """Reading a non-blocking device-to-host copy before any sync is flagged once per step; the baseline never is."""
    cell, staged = _cell("mlp", "d2h_nonblocking_unsynced")
    record = measure_syncs(cell, staged)
    assert record["unsynced_reads_per_step"] == 1.0
    cell, staged = _cell("mlp", "baseline")
    assert measure_syncs(cell, staged)["unsynced_reads_per_step"] == 0.0
