"""How a loop keeps its running loss, its accuracy and its evaluation totals: one entry per idiom.

A training loop's running loss is three steps: `train_loss = start(device)` before the loop,
`train_loss += read(loss)` after every step, `result(train_loss, losses)` after the epoch (`LossTracking`).
`read` is called on the loop's own line, so a sync it causes (the seed's `.item()`) is attributed to the
loop; whatever a `read` does beyond one call is attributed to its line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


# ---------------------------------------------------------------- loss tracking (training)
@dataclass(frozen=True)
class LossTracking:
    """`train_loss = start(device)`; `train_loss += read(loss)` per step; `result(train_loss, losses)`."""

    start: Callable[[torch.device], Any]
    read: Callable[[torch.Tensor], Any]
    result: Callable[[Any, int], Any]


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), device=device)


def _empty(device: torch.device) -> list:
    return []


LOSS_TRACKING = {
    # the seed's first loop: `train_loss += loss.item()`, then train_loss / len(trainloader); a sync every step
    "item": LossTracking(lambda device: 0.0, torch.Tensor.item, lambda total, n: total / n),
    # the seed's second loop: a list of .item() values, torch.tensor(list).mean(): a host tensor, no device sync
    "item_list": LossTracking(_empty, lambda loss: [loss.item()],
                              lambda values, n: torch.tensor(values).mean().item()),
    # `running += loss.detach()` on the device; the epoch's only sync is the final .item()
    "tensor_sum": LossTracking(_zero, torch.Tensor.detach, lambda running, n: (running / n).item()),
    # a list of detached losses, torch.stack(list).mean() at the end: one sync per epoch
    "tensor_list_stack": LossTracking(_empty, lambda loss: [loss.detach()],
                                      lambda values, n: torch.stack(values).mean().item()),
    # a list of detached losses through torch.tensor(list): it reads every element back, a sync each on CUDA
    "tensor_list_totensor": LossTracking(_empty, lambda loss: [loss.detach()],
                                         lambda values, n: torch.tensor(values).mean().item()),
    # `running += loss` with no detach: the running loss keeps every step's autograd graph (bug); the result
    # is still a tensor with a grad_fn
    "graph_sum": LossTracking(_zero, lambda loss: loss, lambda running, n: running / n),
    # `train_loss += float(loss.to("cpu", non_blocking=True))`: no sync, so on CUDA it reads the copy before
    # it has landed (bug)
    "nonblocking_readback": LossTracking(lambda device: 0.0,
                                         lambda loss: float(loss.detach().to("cpu", non_blocking=True)),
                                         lambda total, n: total / n),
    # under DDP: the mean of every rank's loss, all-reduced every step, then read back (`dist.all_reduce(loss)`,
    # `loss.item() / world_size`): one collective and one sync per step
    "allreduce_per_step": LossTracking(lambda device: 0.0, lambda loss: _all_reduced_mean(loss.detach()).item(),
                                       lambda total, n: total / n),
    # under DDP: `running += loss.detach()` on the device, all-reduced once at the end of the epoch
    "allreduce_per_epoch": LossTracking(_zero, torch.Tensor.detach,
                                        lambda running, n: (_all_reduced_mean(running) / n).item()),
}


def _all_reduced_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks (`t` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


# ---------------------------------------------------------------- accuracy counting (training)
class NoAccuracy:
    def __init__(self, device: torch.device):
        pass

    def add(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        pass


class AccuracyItem:
    """`correct += pred.eq(y).sum().item()` every step: one more sync per step."""

    def __init__(self, device: torch.device):
        self.correct = self.total = 0

    def add(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += output.argmax(1).eq(labels).sum().item()  # sync point
        self.total += labels.numel()

    def result(self) -> float:
        return self.correct / self.total


class AccuracyTensor:
    """An int64 correct-count on the device, read once per epoch."""

    def __init__(self, device: torch.device):
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.total = 0

    def add(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += output.argmax(1).eq(labels).sum()
        self.total += labels.numel()

    def result(self) -> float:
        return self.correct.item() / self.total  # the epoch's one sync for accuracy


ACCURACY = {"none": NoAccuracy, "item": AccuracyItem, "tensor": AccuracyTensor}


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
