"""The canonical training and evaluation loops, written once.

`train_epoch` is the seed article's loop: zero_grad -> forward -> loss -> backward -> step, with
`train_loss += loss.item()` and the epoch loss `train_loss / number of batches`. `eval_epoch` is its
`test()`. Each idiom a variant may change is a field of `Idioms` (training) or `EvalIdioms`
(evaluation); the loops read those fields and nothing else, so a variant is a set of field values and
two variants compose by setting two different fields.

Loops never time, synchronise for measurement, or log: the harness does that from outside, through the
iterable it passes as `run.batches`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Run:
    """What a loop gets: the workload's parts, on `device`, and this epoch's batches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    device: torch.device


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r}: choose one of {', '.join(choices)}")



# ---------------------------------------------------------------- loss tracking (training)
class ItemSum:
    """`train_loss += loss.item()`; epoch loss = train_loss / batches (the seed's first loop)."""

    def __init__(self, device: torch.device):
        self.total = 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.item()  # note: a host-device sync point, every step

    def result(self, batches: int) -> Any:
        return self.total / batches


class ItemListMean:
    """List of `.item()` values, `torch.tensor(list).mean()` at the end (the seed's second loop)."""

    def __init__(self, device: torch.device):
        self.values: list[float] = []

    def add(self, loss: torch.Tensor) -> None:
        self.values.append(loss.item())  # sync point, every step

    def result(self, batches: int) -> Any:
        return torch.tensor(self.values).mean().item()  # a host tensor: no device sync


class TensorSum:
    """`running += loss.detach()` on the device; one `.item()` per epoch."""

    def __init__(self, device: torch.device):
        self.running = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.running += loss.detach()

    def result(self, batches: int) -> Any:
        return (self.running / batches).item()  # the epoch's only sync


class TensorListStack:
    """List of detached losses; `torch.stack(list).mean()` at the end: one sync per epoch."""

    def __init__(self, device: torch.device):
        self.values: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.values.append(loss.detach())

    def result(self, batches: int) -> Any:
        return torch.stack(self.values).mean().item()


class TensorListToTensor:
    """List of detached losses through `torch.tensor(list)`: one sync per element on CUDA."""

    def __init__(self, device: torch.device):
        self.values: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.values.append(loss.detach())

    def result(self, batches: int) -> Any:
        return torch.tensor(self.values).mean().item()  # reads every element back: a sync each


class GraphSum:
    """`running += loss` with no detach: the running loss keeps every step's autograd graph (bug)."""

    def __init__(self, device: torch.device):
        self.running = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.running += loss

    def result(self, batches: int) -> Any:
        return self.running / batches  # still a tensor with a grad_fn


LOSS_TRACKING = {
    "item": ItemSum,
    "item_list": ItemListMean,
    "tensor_sum": TensorSum,
    "tensor_list_stack": TensorListStack,
    "tensor_list_totensor": TensorListToTensor,
    "graph_sum": GraphSum,
}


# ---------------------------------------------------------------- zeroing style
def zero_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()  # set_to_none=True, the default since PyTorch 2.0


def zero_optimizer_keep(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=False)  # one zero_() per parameter tensor


def zero_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.zero_grad()


def zero_by_hand(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


ZEROING = {
    "optimizer": zero_optimizer,
    "optimizer_set_to_none_false": zero_optimizer_keep,
    "model": zero_model,
    "manual_none": zero_by_hand,
}

ZERO_GRAD_AT = ("before_forward", "before_backward", "between_backward_and_step", "after_step", "missing")


@dataclass(frozen=True)
class Idioms:
    """The choices a training loop makes; the defaults are the seed's loop (`baseline`)."""

    loss_tracking: str = "item"
    zero_grad_at: str = "before_forward"
    zeroing: str = "optimizer"

    def __post_init__(self) -> None:
        _check_choice("loss_tracking", self.loss_tracking, LOSS_TRACKING)
        _check_choice("zero_grad_at", self.zero_grad_at, ZERO_GRAD_AT)
        _check_choice("zeroing", self.zeroing, ZEROING)


def train_epoch(run: Run, idioms: Idioms = Idioms()) -> Any:
    """One epoch over `run.batches`; returns the epoch loss as the loop reports it."""
    model, optimizer, criterion, device = run.model, run.optimizer, run.criterion, run.device
    tracker = LOSS_TRACKING[idioms.loss_tracking](device)
    zero_grad = ZEROING[idioms.zeroing]
    at = idioms.zero_grad_at
    model.train()
    batches = 0
    for data, labels in run.batches:
        data, labels = data.to(device), labels.to(device)
        if at == "before_forward":
            zero_grad(model, optimizer)
        target = model(data)
        loss = criterion(target, labels)
        if at == "before_backward":
            zero_grad(model, optimizer)
        loss.backward()
        if at == "between_backward_and_step":
            zero_grad(model, optimizer)
        optimizer.step()
        if at == "after_step":
            zero_grad(model, optimizer)
        tracker.add(loss)
        batches += 1
    return tracker.result(batches)


# ---------------------------------------------------------------- evaluation
class EvalItem:
    """`test_loss += loss.item()` and `correct += pred.eq(y).sum().item()` per batch (the seed's test())."""

    def __init__(self, device: torch.device):
        self.loss, self.correct = 0.0, 0

    def add(self, loss: torch.Tensor, hits: torch.Tensor) -> None:
        self.loss += loss.item()  # sync point
        self.correct += hits.item()  # sync point

    def result(self) -> tuple[Any, Any]:
        return self.loss, self.correct


class EvalTensor:
    """Loss and an int64 correct-count accumulated on the device; one read-back at the end."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, hits: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.correct += hits

    def result(self) -> tuple[Any, Any]:
        loss, correct = torch.stack([self.loss, self.correct.double()]).tolist()  # the one sync
        return loss, int(correct)


class EvalGraph:
    """`test_loss += loss` without no_grad: every batch's activations stay referenced (bug)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = 0

    def add(self, loss: torch.Tensor, hits: torch.Tensor) -> None:
        self.loss += loss
        self.correct += hits.item()

    def result(self) -> tuple[Any, Any]:
        return self.loss, self.correct


EVAL_TRACKING = {"item": EvalItem, "tensor": EvalTensor, "graph": EvalGraph}
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
            outputs = model(data)
            loss = criterion(outputs, labels)
            _, predicted = outputs.max(1)
            tracker.add(loss, predicted.eq(labels).sum())
            total += labels.size(0)
            batches += 1
    loss_sum, correct = tracker.result()
    return loss_sum / batches, correct / total
