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
* Around each block, outside its timed region, `LoadWatch` reads what tells interference from the loop's own
  cost: the main thread's CPU time and the process's over the block's wall time, and the other runnable
  processes at its start and end (`reports.stats.reliability` judges them).
"""

from __future__ import annotations

import os
import time

import torch

try:
    import resource
except ImportError:  # Windows: no getrusage; the readings it gives are None there
    resource = None


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

    @property
    def sampler(self):  # a distributed loop's `run.batches.sampler.set_epoch(epoch)`
        return getattr(self.batches, "sampler", None)

    def __iter__(self):
        self.count = 0  # a loop that peeks at a batch first (`next(iter(loader))`) is timed over its real pass
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
    return run_block(cell, StepClock(cell.batches(batches), cell.device))


def run_block(cell, clock: StepClock) -> tuple[list[float], object]:
    """Run one block through a clock made before it (its CUDA events pre-created): the timed part of `time_block`,
    which pytest-benchmark's timer wraps in the pytest plugin."""
    reported = cell.epoch(clock)
    clock.mark()
    return clock.step_times_s(), reported


class LoadWatch:
    """Context manager around one timed block (never inside it): on exit `figures` holds the block's `wall_s`, the
    process's `cpu_s` (user + system, every thread), the main thread's `main_cpu_s`, `wait_s` (the time this
    process's threads spent runnable but waiting for a CPU, summed), the main thread's `involuntary_switches`
    (preemptions), `others_running` ([at the start, at the end]: /proc/loadavg's running count less this process's
    running threads), and the `threads` torch uses and the `cores` it may run on. What a platform cannot tell is
    None. `reports.stats.block_interference` judges them."""

    def __enter__(self):
        self.figures: dict = {}
        self._others = [others_running()]
        self._waits = _thread_waits()
        self._cpu, self._main, self._switches = _process_cpu_s(), time.thread_time(), _thread_switches()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        cpu, main, switches = _process_cpu_s(), time.thread_time(), _thread_switches()
        waits = _thread_waits()
        self._others.append(others_running())
        self.figures = {
            "wall_s": wall, "cpu_s": cpu - self._cpu if cpu is not None and self._cpu is not None else None,
            "main_cpu_s": main - self._main,
            "wait_s": sum(w - self._waits.get(tid, 0) for tid, w in waits.items()) / 1e9
            if waits is not None and self._waits is not None else None,
            "involuntary_switches": switches - self._switches if switches is not None and self._switches is not None
            else None,
            "others_running": self._others, "threads": torch.get_num_threads(),
            "cores": usable_cores(),
        }
        return False


def others_running() -> int | None:
    """Runnable tasks on the machine that are not threads of this process (Linux; None elsewhere)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    own = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
    except OSError:
        return None
    return max(running - own, 0)


def _thread_waits() -> dict[str, int] | None:
    """Nanoseconds each thread of this process has spent runnable but waiting for a CPU (the second field of
    /proc/<pid>/task/<tid>/schedstat; Linux with scheduler statistics, None elsewhere)."""
    waits = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    waits[tid] = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
    except OSError:
        return None
    return waits or None


def _process_cpu_s() -> float | None:
    if resource is None:
        return None
    try:
        usage = resource.getrusage(resource.RUSAGE_SELF)
    except (OSError, ValueError):
        return None
    return usage.ru_utime + usage.ru_stime


def _thread_switches() -> int | None:
    who = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None
    if who is None:
        return None
    try:
        return resource.getrusage(who).ru_nivcsw
    except (OSError, ValueError):
        return None


def usable_cores() -> int | None:
    """The CPU cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()
