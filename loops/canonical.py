"""The canonical training and evaluation loops, written once.

`TrainLoop` is the seed article's loop: zero_grad -> forward -> loss -> backward -> step, with
`train_loss += loss.item()` and the epoch loss `train_loss / number of batches`. `eval_epoch` is its
`test()`. Each idiom a variant may change is a field of `Idioms` (training) or `EvalIdioms`
(evaluation); the loops read those fields and nothing else, so a variant is a set of field values and
two variants compose by setting two different fields.

A training loop is prepared once per model and optimizer, as a training script sets up its autocast
context, its GradScaler and `torch.compile` before its loop: `TrainLoop(idioms, model, optimizer, device)`
resolves every choice and makes the state that must last from epoch to epoch; calling it runs one epoch.

Loops never time, synchronise for measurement, or log: the harness does that from outside, through the
iterable it passes as `run.batches`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loops.choices import (
    NO_SYNC,
    OPTIMIZER_IMPL,
    PRECISION,
    ZERO_GRAD_AT,
    ZEROING,
    autocast,
    grad_scaler,
    no_sync_contexts,
    use_implementation,
)
from loops.graphs import GRAPHABLE, GraphedStep
from loops.trackers import ACCURACY, EVAL_TRACKING, LOSS_TRACKING


@dataclass
class Run:
    """What a loop gets: the workload's parts, on `device`, and this epoch's batches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module | None  # None: the model computes its own loss (see `own_loss`)
    batches: Iterable[Any]  # (data, labels) pairs for the built-in loops; a user's loop may read any structure
    device: torch.device
    epoch: int = 0  # epochs this loop has run before this one: what a DDP script tells `sampler.set_epoch`


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r}: choose one of {', '.join(choices)}")


# ---------------------------------------------------------------- forward pass and loss
def own_loss(output) -> torch.Tensor | None:
    """The loss a model computed itself, carried by its output: Hugging Face's `outputs.loss` (or `["loss"]`),
    nanoGPT's and minGPT's `(logits, loss)` (the one scalar floating-point tensor of a tuple); None if there is none."""
    if isinstance(output, torch.Tensor):
        return None
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)):
        scalars = [t for t in output if isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point()]
        loss = scalars[0] if len(scalars) == 1 else None
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def model_and_loss(model: nn.Module, criterion: nn.Module | None, data, labels):
    """`output = model(data); loss = criterion(output, labels)`, or, for a model computing its own loss (no criterion),
    `output = model(data, labels)` and the loss it carries."""
    if criterion is not None:
        output = model(data)
        return output, criterion(output, labels)
    output = model(data, labels)
    loss = own_loss(output)
    if loss is None:
        raise TypeError(f"the workload has no criterion, and {type(model).__name__}(data, labels) returned "
                        f"{type(output).__name__} with no loss in it")
    return output, loss


def forward_loss(model: nn.Module, criterion: nn.Module | None, data: torch.Tensor, labels: torch.Tensor):
    """The seed's forward pass and loss; `torch.compile` compiles this function, forward and loss as one."""
    return model_and_loss(model, criterion, data, labels)


def forward_loss_checked(model: nn.Module, criterion: nn.Module | None, data: torch.Tensor, labels: torch.Tensor):
    """forward_loss with a NaN guard that reads the loss back: inside a compiled region, a graph break."""
    output, loss = model_and_loss(model, criterion, data, labels)
    if not math.isfinite(loss.item()):
        raise FloatingPointError("loss is not finite")
    return output, loss


COMPILE = ("none", "default", "reduce_overhead", "with_item_check")


def compiled(mode: str):
    """The forward-and-loss function the loop calls: eager, or a torch.compile of it (compiled on first call)."""
    if mode == "none":
        return forward_loss
    fn = forward_loss_checked if mode == "with_item_check" else forward_loss
    return torch.compile(fn, **({"mode": "reduce-overhead"} if mode == "reduce_overhead" else {}))


# ---------------------------------------------------------------- training
@dataclass(frozen=True)
class Idioms:
    """The choices a training loop makes; the defaults are the seed's loop (`baseline`)."""

    loss_tracking: str = "item"
    zero_grad_at: str = "before_forward"
    zeroing: str = "optimizer"
    accuracy: str = "none"
    precision: str = "fp32"
    optimizer_impl: str = "default"
    non_blocking: bool = False  # host-to-device copies of the batch
    compile: str = "none"  # torch.compile of forward + loss
    accumulate: int = 1  # micro-batches per optimizer step
    divide_by_accumulate: bool = True  # loss / accumulate before backward()
    cuda_graph: bool = False  # the whole step captured once as a CUDA graph, replayed per batch
    no_sync: str = "none"  # which micro-batches run under DDP's model.no_sync() (loops.choices.NO_SYNC)
    set_epoch: bool = True  # sampler.set_epoch(epoch) before each epoch, where the batches have a DistributedSampler

    def __post_init__(self) -> None:
        _check_choice("loss_tracking", self.loss_tracking, LOSS_TRACKING)
        _check_choice("zero_grad_at", self.zero_grad_at, ZERO_GRAD_AT)
        _check_choice("zeroing", self.zeroing, ZEROING)
        _check_choice("accuracy", self.accuracy, ACCURACY)
        _check_choice("precision", self.precision, PRECISION)
        _check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPL)
        _check_choice("compile", self.compile, COMPILE)
        _check_choice("no_sync", self.no_sync, NO_SYNC)
        if self.accumulate < 1:
            raise ValueError(f"accumulate={self.accumulate}: must be >= 1")
        for name, needed in GRAPHABLE.items() if self.cuda_graph else ():
            if getattr(self, name) != needed:
                raise ValueError(f"cuda_graph captures the step with {name}={needed!r}, "
                                 f"not {getattr(self, name)!r}")


class TrainLoop:
    """The training loop of one set of idioms, prepared for one model and optimizer; `loop(run)` runs one
    epoch over `run.batches` and returns the epoch loss as the loop reports it (and the accuracy, when the
    loop counts it).

    Everything that must outlive an epoch is made here, once: the GradScaler (its scale carries over), the
    compiled forward-and-loss function (compiled once, on its first call), the captured CUDA graph's
    `GraphedStep`, and the optimizer's kernel flags.
    """

    def __init__(self, idioms: Idioms, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.idioms = idioms
        use_implementation(optimizer, idioms.optimizer_impl)
        self.zero_grad = ZEROING[idioms.zeroing]
        self.autocast = autocast(idioms.precision, device)
        self.scaler = grad_scaler(idioms.precision, device)
        self.forward = compiled(idioms.compile)
        self.loss_tracking = LOSS_TRACKING[idioms.loss_tracking]
        self.accuracy = ACCURACY[idioms.accuracy]
        self.graphed = GraphedStep(optimizer, device) if idioms.cuda_graph else None

    def device_tensors(self) -> list[torch.Tensor]:
        """The device tensors the loop holds besides the model's and the optimizer's (a captured step's)."""
        return self.graphed.device_tensors() if self.graphed else []

    def __call__(self, run: Run) -> Any:
        model, optimizer, criterion, device = run.model, run.optimizer, run.criterion, run.device
        zero_grad, zero_grad_at, k = self.zero_grad, self.idioms.zero_grad_at, self.idioms.accumulate
        no_sync = self.idioms.no_sync
        divide = k > 1 and self.idioms.divide_by_accumulate
        ctx, forward, scaler, read = self.autocast, self.forward, self.scaler, self.loss_tracking.read
        # a disabled GradScaler passes through (scale(loss) is loss, step(optimizer) is optimizer.step()): the step
        # calls it only when it is enabled, so that the seed's step pays for no call it does not make
        scaling, counting = scaler.is_enabled(), self.idioms.accuracy != "none"
        non_blocking = self.idioms.non_blocking
        train_loss = self.graphed.new_epoch() if self.graphed else self.loss_tracking.start(device)
        accuracy = self.accuracy(device)

        def step(batch_data: torch.Tensor, batch_labels: torch.Tensor) -> int:
            """One batch, the seed's lines in the seed's order (each choice's seed value in the comments);
            returns how many losses it tracked (one per micro-batch)."""
            nonlocal train_loss
            if zero_grad_at == "before_forward":
                zero_grad(model, optimizer)  # optimizer.zero_grad()
            seen = []
            for i, (data, labels) in enumerate(micro_batches(batch_data, batch_labels, k)):  # the batch itself
                quiet, quiet_backward = no_sync_contexts(no_sync, model, i, k)  # no model.no_sync()
                with quiet:
                    with ctx:  # fp32: no autocast
                        output, loss = forward(model, criterion, data, labels)  # output = model(data); loss = ...
                    if zero_grad_at == "before_backward":
                        zero_grad(model, optimizer)
                    backward = loss / k if divide else loss
                    with quiet_backward:
                        (scaler.scale(backward) if scaling else backward).backward()  # loss.backward()
                seen.append((output, loss, labels))
            if zero_grad_at == "between_backward_and_step":
                zero_grad(model, optimizer)
            if scaling:  # an enabled scaler skips optimizer.step() while its scale calibrates
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()  # optimizer.step()
            if zero_grad_at == "after_step":
                zero_grad(model, optimizer)
            for output, loss, labels in seen:
                train_loss += read(loss)  # train_loss += loss.item()
                if counting:  # no accuracy counted
                    accuracy.add(output, labels)
            return len(seen)

        if self.graphed:
            step = functools.partial(self.graphed, step)
        sampler = getattr(run.batches, "sampler", None)
        if self.idioms.set_epoch and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(run.epoch)  # a DistributedSampler: a new order every epoch
        model.train()
        tracked = 0
        for data, labels in run.batches:
            data = data.to(device, non_blocking=non_blocking)
            labels = labels.to(device, non_blocking=non_blocking)
            tracked += step(data, labels)
        epoch_loss = self.loss_tracking.result(train_loss, tracked)
        return epoch_loss if self.idioms.accuracy == "none" else (epoch_loss, accuracy.result())


def micro_batches(data: torch.Tensor, labels: torch.Tensor, k: int):
    """The batch as `k` micro-batches for gradient accumulation; the batch itself when k is 1."""
    return zip(data.chunk(k), labels.chunk(k)) if k > 1 else ((data, labels),)


def train_epoch(run: Run, idioms: Idioms = Idioms()) -> Any:
    """One epoch of a loop prepared for this call alone; a loop run epoch after epoch is a `TrainLoop` made
    once, so that its GradScaler, compiled function and captured step carry over."""
    return TrainLoop(idioms, run.model, run.optimizer, run.device)(run)


# ---------------------------------------------------------------- evaluation
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enabled": torch.enable_grad}


@dataclass(frozen=True)
class EvalIdioms:
    """The choices an evaluation loop makes; the defaults are the seed's `test()` (`eval_baseline`)."""

    grad_mode: str = "no_grad"
    tracking: str = "item"

    def __post_init__(self) -> None:
        _check_choice("grad_mode", self.grad_mode, GRAD_MODES)
        _check_choice("tracking", self.tracking, EVAL_TRACKING)


def eval_epoch(run: Run, idioms: EvalIdioms = EvalIdioms()) -> tuple[Any, float]:
    """One pass over `run.batches`; returns (mean batch loss, accuracy) as the loop reports them."""
    model, criterion, device = run.model, run.criterion, run.device
    tracker = EVAL_TRACKING[idioms.tracking](device)
    model.eval()
    batches = total = 0
    with GRAD_MODES[idioms.grad_mode]():
        for data, labels in run.batches:
            data, labels = data.to(device), labels.to(device)
            outputs, loss = model_and_loss(model, criterion, data, labels)
            _, predicted = (outputs if isinstance(outputs, torch.Tensor) else outputs[0]).max(1)
            tracker.add(loss, predicted.eq(labels).sum())
            total += labels.size(0)
            batches += 1
    loss_sum, correct = tracker.result()
    return loss_sum / batches, correct / total
