"""The whole-step CUDA graph variant (`cuda_graph_step`) and the batch-boundary correctness check it needs.

On CPU a CUDA graph cannot be captured; `Replayer` stands in for one (capturing runs nothing, each replay
runs the captured step again, as a graph's kernels do), so the logic around the capture (eager warm-up,
static inputs, the per-epoch running loss, fixed shapes) is tested here. The real capture is tested by the
`cuda` tests, which skip without a GPU.
"""

import dataclasses

import pytest
import torch

from bench import correctness
from bench.cell import build_cell, stage_batches
from bench.syncs import measure_syncs
from loops import graphs, resolve_variant, resolve_workload

CPU = torch.device("cpu")


class Replayer:
    """A CPU stand-in for a captured CUDA graph."""

    captures = 0

    def __init__(self, fn, stream):
        assert stream is None  # no CUDA stream on CPU
        type(self).captures += 1
        self.fn = fn

    def replay(self):
        self.fn()


class ReplayTwice(Replayer):
    """A faulty graph: every replay runs two optimizer steps."""

    def replay(self):
        self.fn()
        self.fn()


def on_cpu(name: str, **changes):
    return dataclasses.replace(resolve_variant(name), requires=None, **changes)


@pytest.fixture
def replayer(monkeypatch):
    Replayer.captures = 0
    monkeypatch.setattr(graphs, "capture", Replayer)
    return Replayer


def test_the_variant_is_cuda_only_and_names_its_idioms():
    from reports.results import FLOOR_VARIANT

    v = resolve_variant(FLOOR_VARIANT)  # the reports' floor is this variant
    assert v.requires == "cuda" and v.replays_graph and v.idiom == "CUDA graphs"
    record = correctness.check(resolve_workload("mlp"), v, CPU)
    assert record["verdict"] == "skipped" and record["verdict_reason"] == "needs a CUDA GPU"


@pytest.mark.parametrize("name,message", [
    ("cuda_graph_step+train_acc_item", "accuracy='none', not 'item'"),
    ("cuda_graph_step+bf16_autocast", "precision='fp32', not 'bf16_autocast'"),
    ("cuda_graph_step+grad_accum_2", "accumulate=1, not 2"),
    ("cuda_graph_step+zero_grad_after_step", "zero_grad_at='before_forward', not 'after_step'"),
])
def test_what_a_captured_step_cannot_hold_is_refused_by_name(name, message):
    from loops import BadName

    with pytest.raises(BadName, match=message):
        resolve_variant(name)


@pytest.mark.parametrize("workload", ["mlp", "cnn"])
def test_warm_up_capture_and_replays_train_as_the_baseline_does(replayer, workload):
    record = correctness.check(resolve_workload(workload), on_cpu("cuda_graph_step"), CPU, epochs=2, steps=4)
    # the running loss is a float32 sum on the device, the baseline's a float64 one: equal within rounding
    assert record["verdict"] in ("identical", "equivalent"), record["verdict_reason"]
    assert record["param_max_rel_diff"] == 0.0  # the same kernels in the same order: bitwise equal weights
    assert record["skipped_steps"] == 0
    assert replayer.captures == 1  # the trajectory's cell, once: the unsynced-read pass counts one more epoch on it


def test_one_eager_step_then_one_capture_then_replays(replayer):
    wl = resolve_workload("mlp")
    staged = stage_batches(wl, "train", 5, CPU)
    cell = build_cell(wl, on_cpu("cuda_graph_step"), CPU)
    graphed = cell.loop.graphed  # made with the cell, once
    replays = []
    cell.epoch(staged[:3])
    graph = graphed.graph
    graph.replay = lambda original=graph.replay: (replays.append(1), original())
    cell.epoch(staged[3:])
    assert graphed.eager_steps == graphs.GRAPH_WARMUP_STEPS == 1
    assert replayer.captures == 1 and graphed.graph is graph and len(replays) == 2


def test_the_captured_step_holds_no_sync(replayer):
    """A sync inside a capture is an error on CUDA: the step that gets captured reads nothing back, and the
    epoch's one read is its final .item()."""
    wl = resolve_workload("mlp")
    staged = stage_batches(wl, "train", 8, CPU)
    cell = build_cell(wl, on_cpu("cuda_graph_step"), CPU)
    cell.epoch(staged[:2])  # the eager step and the capture
    assert measure_syncs(cell, staged)["syncs_per_step"] == pytest.approx(1 / 8)


def test_the_running_loss_restarts_every_epoch(replayer):
    wl = resolve_workload("mlp")
    staged = stage_batches(wl, "train", 4, CPU)
    graphed_cell = build_cell(wl, on_cpu("cuda_graph_step"), CPU)
    eager_cell = build_cell(wl, resolve_variant("tensor_sum"), CPU)
    for epoch in (staged[:2], staged[2:]):
        assert graphed_cell.epoch(epoch) == eager_cell.epoch(epoch)


def test_a_batch_of_another_shape_is_refused(replayer):
    wl = resolve_workload("conditional")  # its tasks alternate input widths 20 and 12
    staged = stage_batches(wl, "train", 4, CPU)
    cell = build_cell(wl, on_cpu("cuda_graph_step"), CPU)
    for group in cell.optimizer.param_groups:
        group["capturable"] = False  # Adam's capturable path needs a GPU; the shape check comes first
    with pytest.raises(ValueError, match=r"a CUDA graph replays fixed shapes: got a batch of \(32, 20\)"):
        cell.epoch(staged)


def test_boundary_check_catches_a_graph_that_steps_twice(monkeypatch):
    monkeypatch.setattr(graphs, "capture", ReplayTwice)
    record = correctness.check(resolve_workload("mlp"), on_cpu("cuda_graph_step"), CPU)
    assert record["verdict"] == "broken", record["verdict_reason"]  # each replay adds its loss twice, too


@pytest.mark.parametrize("variant,verdict,reason", [
    ("baseline", "identical", "bitwise equal"),
    ("zero_grad_missing", "broken", "step 2 consumed the sum of 2 batch gradients"),
    ("grad_accum_2_no_divide", "different", "step 1 used 2x its batch gradient"),
    ("graph_sum", "broken", "autograd graph"),
])
def test_boundary_check_agrees_with_the_hooks_on_eager_loops(variant, verdict, reason):
    """The boundary check, forced on eager loops, finds what the hooks find."""
    record = correctness.check(resolve_workload("mlp"), on_cpu(variant, replays_graph=True), CPU)
    assert record["verdict"] == verdict and reason in record["verdict_reason"]


@pytest.mark.cuda
@pytest.mark.parametrize("workload", ["mlp", "cnn", "digits"])
def test_cuda_graph_step_on_cuda(workload):
    device = torch.device("cuda")
    wl = resolve_workload(workload)
    v = resolve_variant("cuda_graph_step")
    record = correctness.check(wl, v, device, epochs=2, steps=4)
    assert record["verdict"] in ("identical", "equivalent"), record["verdict_reason"]
    staged = stage_batches(wl, "train", 8, device)
    cell = build_cell(wl, v, device)
    cell.epoch(staged[:2])  # warm-up step and capture
    syncs = measure_syncs(cell, staged)
    assert syncs["syncs_per_step"] == pytest.approx(1 / 8)  # the epoch's one .item()
    assert syncs["ops_per_step"] <= 3  # two copies into the static inputs; the step itself is one replay
