"""A cell: its loop is prepared once, when it is built, and a live input pipeline reads the workload's own
seeded DataLoader."""

import math

import pytest
import torch

from bench import correctness
from bench.cell import LiveBatches, build_cell, stage_batches
from bench.syncs import measure_syncs
from bench.timing import time_block
from loops import example_user, resolve_variant, resolve_workload, verdict_matches

CPU = torch.device("cpu")


@pytest.mark.parametrize("workload,variant", [("conditional", "input_pageable_w0"), ("mlp", "input_pageable_w0"),
                                              ("mlp", "input_pageable_w2")])
def test_a_live_loader_reads_the_staged_batches_in_their_order(workload, variant):
    """A live input pipeline (workers or not, whole-batch datasets too) is the workload's seeded DataLoader:
    the same batches, in the same order, as the staged ones every other variant reads."""
    wl = resolve_workload(workload)
    staged = stage_batches(wl, "train", 5, CPU)
    live = list(LiveBatches(wl, resolve_variant(variant).input_loader).take(len(staged)))
    assert len(live) == len(staged)
    for (x, y), (sx, sy) in zip(live, staged):
        assert torch.equal(x, sx) and torch.equal(y, sy)


def test_input_pageable_w0_on_conditional_gets_its_verdict_and_its_timing():
    """The workload whose Dataset yields whole batches runs an input-pipeline variant: the correctness pass
    gives it its expected verdict, not an error, and a timed block over the live loader reports every step."""
    wl, v = resolve_workload("conditional"), resolve_variant("input_pageable_w0")
    record = correctness.check(wl, v, CPU, epochs=2, steps=3)
    assert verdict_matches(record["verdict"], record["expected_verdict"]), record["verdict_reason"]
    staged = stage_batches(wl, "train", 6, CPU)
    cell = build_cell(wl, v, CPU)
    cell.epoch(cell.batches(staged[:2]))
    times, reported = time_block(cell, staged)
    assert len(times) == len(staged) and all(t > 0 for t in times)
    assert math.isfinite(reported)


def test_the_loop_is_prepared_with_the_cell_and_belongs_to_it():
    """What outlives an epoch is made when the cell is built, once per cell: the optimizer's kernel flags
    are set before any step, and two cells of one variant share no GradScaler or compiled function."""
    wl, v = resolve_workload("digits"), resolve_variant("optimizer_foreach")
    a, b = build_cell(wl, v, CPU), build_cell(wl, v, CPU)
    assert all(group["foreach"] and not group["fused"] for group in a.optimizer.param_groups)
    assert a.loop is not b.loop and a.loop.scaler is not b.loop.scaler
    staged = stage_batches(wl, "train", 3, CPU)
    assert a.epoch(staged) == b.epoch(staged)  # the same seed, the same batches: the same epoch


def test_a_users_variant_is_the_cells_loop_as_it_is():
    """A user's `fn(run)` has nothing to prepare (docs/own-loops.md): the cell calls the function itself."""
    v = resolve_variant("loops.example_user:clipped_loop")
    cell = build_cell(example_user.regression(), v, CPU)
    assert cell.loop is example_user.clipped_loop and cell.device_tensors() == []


@pytest.mark.parametrize("workload", ["conditional", "mlp"])
def test_a_live_loaders_batches_are_copied_to_the_device(workload):
    """A pageable live batch costs two blocking host-to-device copies per step, then the seed's .item(), also
    where the Dataset hands out whole batches of its own (staged batches never alias them)."""
    wl = resolve_workload(workload)
    staged = stage_batches(wl, "train", 8, CPU)
    cell = build_cell(wl, resolve_variant("input_pageable_w0"), CPU)
    cell.epoch(cell.batches(staged[:2]))
    assert measure_syncs(cell, staged)["syncs_per_step"] == 3.0


def test_a_loop_that_peeks_at_a_batch_is_timed_over_its_real_pass():
    """`next(iter(run.batches))` before the loop (a script reading its batch size) restarts the block's clock: every
    step is timed once, nothing overflows."""
    from bench.timing import StepClock

    batches = [(torch.zeros(2), torch.zeros(2))] * 4
    clock = StepClock(batches, torch.device("cpu"))
    next(iter(clock))
    for _ in clock:
        pass
    clock.mark()
    assert len(clock.step_times_s()) == 4
