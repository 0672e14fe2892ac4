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

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterable
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


class NonBlockingReadback:
    """`train_loss += float(loss.to("cpu", non_blocking=True))`: reads the copy before it has landed (bug)."""

    def __init__(self, device: torch.device):
        self.total = 0.0

    def add(self, loss: torch.Tensor) -> None:
        self.total += float(loss.detach().to("cpu", non_blocking=True))  # no sync: on CUDA, garbage

    def result(self, batches: int) -> Any:
        return self.total / batches


LOSS_TRACKING = {
    "item": ItemSum,
    "item_list": ItemListMean,
    "tensor_sum": TensorSum,
    "tensor_list_stack": TensorListStack,
    "tensor_list_totensor": TensorListToTensor,
    "graph_sum": GraphSum,
    "nonblocking_readback": NonBlockingReadback,
}


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


# ---------------------------------------------------------------- precision
PRECISION = ("fp32", "bf16_autocast", "fp16_grad_scaler")
_SCALERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16_autocast" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(optimizer: torch.optim.Optimizer, device: torch.device):
    """One GradScaler per optimizer, so that its scale carries over from epoch to epoch."""
    if optimizer not in _SCALERS:
        _SCALERS[optimizer] = torch.amp.GradScaler(device.type)
    return _SCALERS[optimizer]


# ---------------------------------------------------------------- compilation
COMPILE = ("none", "default", "reduce_overhead", "with_item_check")
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_loss(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor):
    target = model(x)
    return target, criterion(target, y)


def forward_loss_checked(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """forward_loss with a NaN guard that reads the loss back: inside a compiled region, a graph break."""
    target = model(x)
    loss = criterion(target, y)
    if not math.isfinite(loss.item()):
        raise FloatingPointError("loss is not finite")
    return target, loss


def compiled(model: nn.Module, mode: str):
    """The forward-and-loss function the loop calls: eager, or torch.compile'd once per model."""
    if mode == "none":
        return forward_loss
    if model not in _COMPILED:
        fn = forward_loss_checked if mode == "with_item_check" else forward_loss
        options = {"mode": "reduce-overhead"} if mode == "reduce_overhead" else {}
        _COMPILED[model] = torch.compile(fn, **options)
    return _COMPILED[model]


# ---------------------------------------------------------------- CUDA graphs
# what a captured step cannot contain: a host read (a sync) per step, a Python-side count, a step whose
# shape changes, autocast's weight cache, a compiled region of its own
GRAPHABLE = {"loss_tracking": "tensor_sum", "zero_grad_at": "before_forward", "accuracy": "none",
             "precision": "fp32", "compile": "none", "accumulate": 1}
GRAPH_WARMUP_STEPS = 1  # eager steps (on a side stream) before the capture: they create the lazy state
_GRAPHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def capture(fn: Callable[[], Any], stream):
    """Capture `fn()` into a CUDA graph on `stream` (nothing runs until `replay()`). Capture errors are
    thread-local: a DataLoader's pin-memory thread may touch CUDA meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        fn()
    return graph


@contextlib.contextmanager
def on_stream(stream):
    """Run the block on `stream`, ordered after and before the current stream (no stream: as is)."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class GraphedStep:
    """The whole training step captured once as a CUDA graph and replayed for every batch.

    The first GRAPH_WARMUP_STEPS batches run the step eagerly on the side stream the capture will use
    (real steps: they create the optimizer's state, the gradients' first tensors and the stream's
    library handles, none of which may be created during a capture). The next batch is copied into
    static input tensors and the step over them (zero_grad, forward, loss, backward, optimizer.step,
    `running += loss.detach()`) is captured; from then on each batch is one copy into the static inputs
    and one `replay()`: the launch-overhead floor of the workload. The running loss is a static tensor
    too, zeroed per epoch. One per optimizer; it holds no reference to the model or the optimizer.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.tracker = TensorSum(device)
        self.eager_steps = 0
        self.graph = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_epoch(self) -> TensorSum:
        self.tracker.running.zero_()
        return self.tracker

    def __call__(self, step: Callable[[torch.Tensor, torch.Tensor], int], data: torch.Tensor,
                 labels: torch.Tensor) -> int:
        if self.graph is None and self.eager_steps < GRAPH_WARMUP_STEPS:
            self.eager_steps += 1
            with on_stream(self.stream):
                return step(data, labels)
        if self.graph is None:
            self.static = (data.clone(), labels.clone())
            self.graph = capture(lambda: step(*self.static), self.stream)
        for new, static in zip((data, labels), self.static):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(f"a CUDA graph replays fixed shapes: got a batch of {tuple(new.shape)} "
                                 f"{new.dtype}, captured {tuple(static.shape)} {static.dtype}")
            static.copy_(new)
        self.graph.replay()
        return 1


def graph_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The device tensors the optimizer's GraphedStep holds (static inputs, running loss); none without one."""
    graphed = _GRAPHED.get(optimizer)
    return [*(graphed.static or ()), graphed.tracker.running] if graphed else []


def graphed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> GraphedStep:
    """The optimizer's GraphedStep, made on first use; optimizers with a `capturable` flag get it set."""
    if optimizer not in _GRAPHED:
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True  # optimizer state (Adam's step count) on the device, graph-safe
        _GRAPHED[optimizer] = GraphedStep(device)
    return _GRAPHED[optimizer]


# ---------------------------------------------------------------- optimizer implementation
OPTIMIZER_IMPL = ("default", "for_loop", "foreach", "fused")


def use_implementation(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Select the optimizer's for-loop, foreach (multi-tensor) or fused kernels, as the constructor's
    `foreach=`/`fused=` would: in every param group (what step() reads) and in the defaults (what
    zero_grad(set_to_none=False) reads: one _foreach_zero_ instead of a zero_() per parameter tensor)."""
    if impl == "default":
        return
    for flags in (optimizer.defaults, *optimizer.param_groups):
        flags["foreach"] = impl == "foreach"
        flags["fused"] = impl == "fused"


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
    accuracy: str = "none"
    precision: str = "fp32"
    optimizer_impl: str = "default"
    non_blocking: bool = False  # host-to-device copies of the batch
    compile: str = "none"  # torch.compile of forward + loss
    accumulate: int = 1  # micro-batches per optimizer step
    divide_by_accumulate: bool = True  # loss / accumulate before backward()
    cuda_graph: bool = False  # the whole step captured once as a CUDA graph, replayed per batch

    def __post_init__(self) -> None:
        _check_choice("loss_tracking", self.loss_tracking, LOSS_TRACKING)
        _check_choice("zero_grad_at", self.zero_grad_at, ZERO_GRAD_AT)
        _check_choice("zeroing", self.zeroing, ZEROING)
        _check_choice("accuracy", self.accuracy, ACCURACY)
        _check_choice("precision", self.precision, PRECISION)
        _check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPL)
        _check_choice("compile", self.compile, COMPILE)
        if self.accumulate < 1:
            raise ValueError(f"accumulate={self.accumulate}: must be >= 1")
        for name, needed in GRAPHABLE.items() if self.cuda_graph else ():
            if getattr(self, name) != needed:
                raise ValueError(f"cuda_graph captures the step with {name}={needed!r}, "
                                 f"not {getattr(self, name)!r}")


def train_epoch(run: Run, idioms: Idioms = Idioms()) -> Any:
    """One epoch over `run.batches`; returns the epoch loss as the loop reports it (and the accuracy,
    when the loop counts it)."""
    device = run.device
    use_implementation(run.optimizer, idioms.optimizer_impl)
    graphed = graphed_step(run.optimizer, device) if idioms.cuda_graph else None
    tracker = graphed.new_epoch() if graphed else LOSS_TRACKING[idioms.loss_tracking](device)
    accuracy = ACCURACY[idioms.accuracy](device)
    step = train_step(run, idioms, tracker, accuracy)
    if graphed:
        step = functools.partial(graphed, step)
    run.model.train()
    tracked = 0
    for data, labels in run.batches:
        data = data.to(device, non_blocking=idioms.non_blocking)
        labels = labels.to(device, non_blocking=idioms.non_blocking)
        tracked += step(data, labels)
    epoch_loss = tracker.result(tracked)
    return epoch_loss if idioms.accuracy == "none" else (epoch_loss, accuracy.result())


def train_step(run: Run, idioms: Idioms, tracker, accuracy) -> Callable[[torch.Tensor, torch.Tensor], int]:
    """The loop's body for one batch: zero_grad -> forward -> loss -> backward -> step, the loss and
    accuracy tracked. The returned `step(data, labels)` says how many losses it tracked (K under
    gradient accumulation)."""
    model, optimizer, criterion, device = run.model, run.optimizer, run.criterion, run.device
    zero_grad = ZEROING[idioms.zeroing]
    at, k = idioms.zero_grad_at, idioms.accumulate
    scaler = grad_scaler(optimizer, device) if idioms.precision == "fp16_grad_scaler" else None
    forward = compiled(model, idioms.compile)

    def step(data: torch.Tensor, labels: torch.Tensor) -> int:
        if at == "before_forward":
            zero_grad(model, optimizer)
        micro_batches = zip(data.chunk(k), labels.chunk(k)) if k > 1 else ((data, labels),)
        seen = []
        for x, y in micro_batches:
            with autocast(idioms.precision, device):
                target, loss = forward(model, criterion, x, y)
            if at == "before_backward":
                zero_grad(model, optimizer)
            to_backward = loss / k if k > 1 and idioms.divide_by_accumulate else loss
            (scaler.scale(to_backward) if scaler else to_backward).backward()
            seen.append((loss, target, y))
        if at == "between_backward_and_step":
            zero_grad(model, optimizer)
        if scaler:
            scaler.step(optimizer)  # skips optimizer.step() while the scale calibrates
            scaler.update()
        else:
            optimizer.step()
        if at == "after_step":
            zero_grad(model, optimizer)
        for loss, target, y in seen:
            tracker.add(loss)
            accuracy.add(target, y)
        return len(seen)

    return step


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
