"""The correctness pass's shortcuts change no verdict: fresh gradients reused from the baseline only where the
step's state and inputs are the baseline's, and the rounding envelope that widens `equivalent`."""

import pytest
import torch

from bench import correctness
from bench.cell import build_cell, stage_batches
from loops import resolve_variant, resolve_workload

CPU = torch.device("cpu")


def _step_state(workload):
    cell = build_cell(workload, resolve_variant("baseline"), CPU)
    (x, y), = stage_batches(workload, "train", 1, CPU)
    pending = [(((x,), {}), y, None, correctness._rng_state(CPU))]
    return cell, pending


def test_a_fresh_gradient_is_reused_only_from_the_same_state_and_inputs():
    """Same parameters, buffers, modes, inputs and random state: the kept gradient; any one changed: none."""
    workload = resolve_workload("cnn")  # BatchNorm buffers and dropout-free: modes and buffers both matter
    cell, pending = _step_state(workload)
    fresh = correctness.FreshGrads()
    grad, _ = correctness._fresh_grad(cell.model, cell.criterion, pending)
    fresh.put(1, cell.model, pending, grad, [])
    assert fresh.get(1, cell.model, pending)[0] is grad
    assert fresh.get(2, cell.model, pending) is None  # another step
    ((x,), _), y, _, rng = pending[0]
    assert fresh.get(1, cell.model, [(((x + 1,), {}), y, None, rng)]) is None  # another input
    assert fresh.get(1, cell.model, [(((x,), {}), (y + 1) % 2, None, rng)]) is None  # other labels
    assert fresh.get(1, cell.model, pending * 2) is None  # two micro-batches
    assert fresh.get(1, cell.model, [(((x.contiguous(memory_format=torch.channels_last),), {}), y, None, rng)]) \
        is None  # the same values laid out otherwise round otherwise
    cell.model.eval()
    assert fresh.get(1, cell.model, pending) is None  # BatchNorm in eval mode: another gradient
    cell.model.train()
    next(b for b in cell.model.buffers() if b.is_floating_point()).add_(1)
    assert fresh.get(1, cell.model, pending) is None
    cell2, _ = _step_state(workload)
    with torch.no_grad():
        next(cell2.model.parameters()).mul_(1 + 2 ** -20)
    assert fresh.get(1, cell2.model, pending) is None


def test_reused_gradients_give_the_verdicts_recomputed_ones_give():
    """Checking with the baseline's kept gradients and without them gives the same records."""
    workload = resolve_workload("mlp")
    shared: dict = {}
    for name in ("baseline", "tensor_sum", "zero_grad_missing", "zero_grad_between_backward_and_step",
                 "grad_accum_2", "grad_accum_2_no_divide", "graph_sum"):
        variant = resolve_variant(name)
        with_reuse = correctness.check(workload, variant, CPU, _cache=shared)
        alone = correctness.check(workload, variant, CPU, _cache={})
        fresh = next(iter(shared.values()))[0]
        assert fresh.steps, "the baseline kept its steps' gradients"
        assert with_reuse == alone, name


def test_the_rounding_envelope_is_the_baselines_distance_from_float64():
    """Training amplifies rounding: the cnn baseline (BatchNorm) ends far past 1e-5 from float64 arithmetic,
    the mlp's stays near it; a variant inside the envelope is `equivalent`, one outside `different`."""
    def envelope_of(name):
        workload = resolve_workload(name)
        staged = stage_batches(workload, "train", 2 * 3, CPU)
        base = correctness.trajectory(workload, resolve_variant("baseline"), CPU, 2, staged)
        return correctness.envelope(workload, resolve_variant("baseline"), CPU, 2, staged, 0, base), base

    (cnn_params, cnn_loss), base = envelope_of("cnn")
    assert cnn_params > 100 * correctness.EQUIV_RTOL
    (mlp_params, _), _ = envelope_of("mlp")
    assert mlp_params < cnn_params / 100
    base.envelope = (cnn_params, cnn_loss)
    variant = resolve_variant("tensor_sum")

    def verdict(scale):
        traj = correctness.Trajectory(reported=base.reported, batch_losses=base.batch_losses,
                                      batch_sizes=base.batch_sizes, hits=base.hits, totals=base.totals,
                                      optimizer_steps=base.optimizer_steps, batches=base.batches,
                                      params={n: p * (1 + scale) for n, p in base.params.items()})
        return correctness.verdict_of(variant, traj, base)

    # up to twice the envelope: a float32 variant as far from exact arithmetic as the baseline, on the other side
    inside, outside = verdict(cnn_params * 1.9), verdict(cnn_params * 2.2)
    assert inside["verdict"] == "equivalent" and "from float64" in inside["verdict_reason"]
    assert outside["verdict"] == "different"
    base.envelope = None
    assert verdict(cnn_params / 2)["verdict"] == "different"  # without the envelope: the fixed 1e-5


def test_a_loop_that_cannot_run_in_float64_has_no_envelope():
    """A model written for float32 only (`x.float()` in its forward) gets None, not a fault."""
    class Float32Only(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.float())

    from loops import Workload
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    workload = Workload(name="f32", build_model=Float32Only, criterion=torch.nn.CrossEntropyLoss(),
                        build_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), train_data=data, batch_size=4)
    staged = stage_batches(workload, "train", 2, CPU)
    base = correctness.trajectory(workload, resolve_variant("baseline"), CPU, 2, staged)
    assert correctness.envelope(workload, resolve_variant("baseline"), CPU, 2, staged, 0, base) is None


def test_the_criterion_the_loop_gets_reads_the_real_ones_attributes():
    """A loop that reads its loss's settings (torchtune's `self._loss_fn.ignore_index`, `reduction`) gets the real
    criterion's values through `run.criterion`, and calling it still records the loss."""
    real = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="mean", label_smoothing=0.1)
    sink, hits, sizes = [], [], []
    seen = correctness._Seen([])
    wrapped = correctness._RecordingCriterion(real, sink, hits, sizes, seen)
    assert (wrapped.ignore_index, wrapped.reduction, wrapped.label_smoothing) == (-100, "mean", 0.1)
    with pytest.raises(AttributeError):
        wrapped.no_such_setting  # noqa: B018
    loss = wrapped(torch.randn(4, 3), torch.tensor([0, 1, 2, -100]))
    assert len(sink) == 1 and float(sink[0]) == pytest.approx(float(loss))


def accumulate_with_leftover(run):
    """Accumulation over 2 batches of an epoch of 3: the third batch's backward pass is left over and cleared by the
    next epoch's zero_grad()."""
    run.model.train()
    run.optimizer.zero_grad()
    total = 0.0
    for i, (data, labels) in enumerate(run.batches):
        loss = run.criterion(run.model(data.to(run.device)), labels.to(run.device))
        (loss / 2).backward()
        total += loss.item()
        if (i + 1) % 2 == 0:
            run.optimizer.step()
            run.optimizer.zero_grad()
    return total / len(run.batches)


def test_a_leftover_micro_batch_is_neither_broken_nor_unverified():
    """With 3 batches per epoch, the step after the leftover consumes the mean gradient of its own 2 batches: every step
    is explained (`different`: two batches a step where the baseline takes one), never `broken`."""
    variant = resolve_variant("tests.test_check_pass:accumulate_with_leftover")
    record = correctness.check(resolve_workload("mlp"), variant, CPU)
    assert record["verdict"] == "different", record["verdict_reason"]
