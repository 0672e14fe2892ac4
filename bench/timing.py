"""The timing pass: per-step times from outside the loop, with nothing else in the timed region.

Method (the same on every device):

* The loop is timed at its own batch boundaries: the harness hands the loop an iterable that takes a
  timestamp each time the loop asks for its next batch, and one more when the loop returns. Step i's
  time is the distance between two marks; the last step also carries the epoch's closing work (the one
  `.item()` of `tensor_sum`, say), which is part of its real cost.
* CPU: `time.perf_counter_ns`. CUDA: one pre-created `torch.cuda.Event` recorded per mark and a single
  `torch.cuda.synchronize()` after the block, so the harness adds no sync inside the block.
* Warm-up steps run first and are never timed (step 0 pays for lazy initialisation and allocation).
* A block is `steps` steps; `repeats` blocks per cell; the cells of one workload and device are
  interleaved round-robin (A B C A B C ...) so that drift in clocks or load hits all of them alike.
* Raw per-step times are kept; statistics come from them (`bench.stats`).
"""

from __future__ import annotations

import time

import torch


class StepClock:
    """Iterable over a block's batches that marks each step boundary."""

    def __init__(self, batches: list, device: torch.device):
        self.batches = batches
        self.cuda = device.type == "cuda"
        marks = len(batches) + 1
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(marks)] if self.cuda else None
        self.ns = [0] * marks
        self.count = 0

    def mark(self) -> None:
        if self.cuda:
            self.events[self.count].record()
        else:
            self.ns[self.count] = time.perf_counter_ns()
        self.count += 1

    def __len__(self) -> int:  # a loop may ask `len(run.batches)`, as it asks `len(train_loader)`
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.mark()
            yield batch

    def step_times_s(self) -> list[float]:
        """Per-step seconds; call after the block's final `mark()`. Synchronises once on CUDA."""
        if self.cuda:
            self.events[self.count - 1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.events[:self.count - 1],
                                                             self.events[1:self.count])]
        return [(b - a) / 1e9 for a, b in zip(self.ns[:self.count - 1], self.ns[1:self.count])]


def time_block(cell, batches: list) -> tuple[list[float], object]:
    """Run one block; returns (per-step seconds, what the loop reported)."""
    clock = StepClock(cell.batches(batches), cell.device)
    reported = cell.epoch(clock)
    clock.mark()
    return clock.step_times_s(), reported
