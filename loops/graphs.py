"""The whole training step captured once as a CUDA graph and replayed for every batch (`cuda_graph_step`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

# what a captured step cannot contain: a host read (a sync) per step, a Python-side count, a step whose
# shape changes, autocast's weight cache, a compiled region of its own
GRAPHABLE = {"loss_tracking": "tensor_sum", "zero_grad_at": "before_forward", "accuracy": "none",
             "precision": "fp32", "compile": "none", "accumulate": 1}
GRAPH_WARMUP_STEPS = 1  # eager steps (on a side stream) before the capture: they create the lazy state


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
    `train_loss += loss.detach()`) is captured; from then on each batch is one copy into the static inputs
    and one `replay()`: the launch-overhead floor of the workload. The running loss is a static tensor
    too, zeroed per epoch. One per cell, made with it; it holds no reference to the model or the optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True  # optimizer state (Adam's step count) on the device, graph-safe
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.train_loss = torch.zeros((), device=device)
        self.eager_steps = 0
        self.graph = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_epoch(self) -> torch.Tensor:
        """The running loss the captured step adds to, zeroed."""
        return self.train_loss.zero_()

    def device_tensors(self) -> list[torch.Tensor]:
        """The device tensors it holds besides the model's and the optimizer's: static inputs, running loss."""
        return [*(self.static or ()), self.train_loss]

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
