"""The harness's sync and memory passes on CPU agree with what REFERENCE-level facts say they must."""

import pytest
import torch

from bench.cell import build_cell, stage_batches
from bench.memory import measure_memory
from bench.syncs import measure_syncs
from loops import resolve_variant, resolve_workload

CPU = torch.device("cpu")
STEPS = 8
GROWING = 1024  # bytes per step: far above the allocator's noise, far below one step of a retained graph


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


def test_sync_sites_name_the_loop_line():
    cell, staged = _cell("mlp", "baseline")
    sites = measure_syncs(cell, staged)["sync_sites"]
    assert len(sites) == 1
    (site, count), = sites.items()
    assert site.endswith(".py:" + site.rsplit(":", 1)[1]) and "canonical.py" in site and count == STEPS


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


@pytest.mark.parametrize("workload,variant", [("mlp", "graph_sum"), ("cnn", "eval_graph_sum")])
def test_retained_graph_grows_memory(workload, variant):
    cell, staged = _cell(workload, variant, steps=24)
    assert measure_memory(cell, staged)["memory_growth_bytes_per_step"] > GROWING


@pytest.mark.parametrize("workload,variant", [("mlp", "baseline"), ("cnn", "baseline"), ("cnn", "eval_baseline")])
def test_correct_loops_do_not_grow(workload, variant):
    cell, staged = _cell(workload, variant, steps=24)
    record = measure_memory(cell, staged)
    assert abs(record["memory_growth_bytes_per_step"]) < GROWING
    assert record["peak_memory_bytes"] > sum(p.numel() * 4 for p in cell.model.parameters())


def test_a_non_blocking_copy_read_before_a_sync_is_flagged():
    cell, staged = _cell("mlp", "d2h_nonblocking_unsynced")
    record = measure_syncs(cell, staged)
    assert record["unsynced_reads_per_step"] == 1.0
    cell, staged = _cell("mlp", "baseline")
    assert measure_syncs(cell, staged)["unsynced_reads_per_step"] == 0.0
