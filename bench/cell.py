"""A cell's parts: a freshly seeded model, optimizer and loss on a device, and staged batches.

Every pass builds its own `Cell`, so the passes never share state: the same seed gives every variant the
same initial weights, and `stage_batches` gives every variant the same batches in the same order.
"""

from __future__ import annotations

import itertools
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
