"""A cell's parts: a freshly seeded model, optimizer and loss on a device, and staged batches.

Every pass builds its own `Cell`, so the passes never share state: the same seed gives every variant the
same initial weights, and `stage_batches` gives every variant the same batches in the same order.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import torch

from loops import Run, Variant, Workload


@dataclass
class Cell:
    workload: Workload
    variant: Variant
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: torch.nn.Module

    def run(self, batches) -> Run:
        return Run(self.model, self.optimizer, self.criterion, batches, self.device)

    def epoch(self, batches):
        """Run the variant's loop once over `batches`; returns what the loop reports."""
        return self.variant.fn(self.run(batches))

    def batches(self, staged: list):
        """What this cell's loop reads: the staged batches, or a live DataLoader for input-pipeline variants."""
        if not self.variant.input_loader:
            return staged
        if getattr(self, "_live", None) is None:
            self._live = LiveBatches(self.workload, self.variant.input_loader)
        return self._live.take(len(staged))


class LiveBatches:
    """A real DataLoader (workers, pinned memory as the variant asks) read block by block, its workers kept."""

    def __init__(self, workload: Workload, options: dict):
        generator = torch.Generator().manual_seed(workload.seed)
        workers = options.get("num_workers", 0)
        self.loader = torch.utils.data.DataLoader(
            workload.train_data, batch_size=workload.batch_size, shuffle=True, drop_last=True,
            generator=generator, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=options.get("pin_memory", False) and torch.cuda.is_available())
        self.iterator = iter(self.loader)

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def take(self, count: int) -> _Block:
        return _Block(self, count)


class _Block:
    """`count` batches from a LiveBatches, drawn as the loop asks for them."""

    def __init__(self, source: LiveBatches, count: int):
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            yield self.source._next()


def reset_compiled() -> None:
    """Forget torch.compile's compiled code (if torch.compile was used at all in this process).

    Every pass builds new models; compiled code is cached per model and dynamo stops compiling a
    function after a few models (its recompile limit), silently running it eagerly after that.
    """
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process so far."""
    dynamo = sys.modules.get("torch._dynamo")
    return sum(dynamo.utils.counters["graph_break"].values()) if dynamo is not None else 0


def build_cell(workload: Workload, variant: Variant, device: torch.device, seed: int = 0) -> Cell:
    torch.manual_seed(workload.seed + seed)
    model = workload.build_model().to(device)
    optimizer = workload.build_optimizer(model.parameters())
    return Cell(workload, variant, device, model, optimizer, workload.criterion.to(device))


def stage_batches(workload: Workload, split: str, count: int, device: torch.device) -> list:
    """`count` batches from the workload's DataLoader (cycled if it is shorter), already on `device`.

    Default cells measure the loop, not the input pipeline: batches are moved to the device once,
    before any pass, so the loop's own `.to(device)` is a no-op, as with a device-resident dataset.
    """
    loader = workload.loader(split)
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), count)
    return [tuple(t.to(device) for t in batch) for batch in batches]


def parse_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "cuda" else name)
