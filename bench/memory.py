"""The memory pass: peak bytes and growth in bytes per step.

CUDA: the caching allocator's own statistics (`max_memory_allocated` after a reset for the peak,
`memory_allocated` at each step boundary for the trace).

CPU: two deterministic figures and one noisy one.
* live tensor bytes: every tensor storage the pass sees (the model's state, the staged batches, and every
  operator's output, tracked by a dispatch mode) counted while it is alive; its maximum is the peak.
* native heap bytes in use (glibc `mallinfo2`): tensors *and* what autograd keeps on the host. Training
  with `running += loss` frees each step's activations at `backward()`, so only graph nodes pile up, and
  only this figure sees them. Its slope is `memory_growth_bytes_per_step` on CPU.
* process RSS, noisy (pages, not bytes), reported as a second figure.

Growth is the least-squares slope over the step boundaries, not last-minus-first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def heap_bytes() -> int | None:
    """Bytes the C heap has handed out and not taken back (None where glibc's mallinfo2 is missing)."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def slope_per_step(trace: list) -> float:
    """Least-squares slope over the step boundaries from the end of the first step on: before it the
    loop's locals (last batch, last loss) do not exist yet, which would read as one step of growth."""
    values = [v for v in trace[1:] if v is not None]
    if len(values) < 3:
        return float("nan")
    return float(np.polyfit(np.arange(len(values)), np.asarray(values, dtype=np.float64), 1)[0])


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, over every storage seen; `peak` is the maximum after any operator.

    `upper` adds every storage seen and subtracts only those found dead at the last sweep, so it never
    undercounts; the storages are swept (an O(n) walk) only when `upper` passes the peak so far, the one
    moment the peak can change.
    """

    def __init__(self, roots=()):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.upper = 0
        self.peak = 0
        self.see(tree_flatten(list(roots))[0])

    def see(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                if s._cdata not in self.storages:
                    self.storages[s._cdata] = (StorageWeakRef(s), s.nbytes())
                    self.upper += s.nbytes()

    def live(self) -> int:
        dead = [k for k, (ref, _) in self.storages.items() if ref.expired()]
        for k in dead:
            del self.storages[k]
        self.upper = sum(n for _, n in self.storages.values())
        return self.upper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.see(tree_flatten(out)[0])
        if self.upper > self.peak:
            self.peak = max(self.peak, self.live())
        return out


class _Sampler:
    """Yields the batches; samples memory at each step boundary (not a timed pass)."""

    def __init__(self, batches, sample):
        self.batches, self.sample, self.trace = batches, sample, []

    def __len__(self) -> int:  # a loop may ask `len(run.batches)`, as it asks `len(train_loader)`
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.trace.append(self.sample())
            yield batch


def measure_memory(cell, batches: list) -> dict:
    """Peak bytes and growth per step over one epoch of `batches` (the cell is already warmed up)."""
    if cell.device.type == "cuda":
        return _measure_cuda(cell, batches)
    state = [*cell.model.parameters(), *cell.model.buffers(), batches,
             [p.grad for p in cell.model.parameters()], list(cell.optimizer.state.values())]
    tracker = LiveTensorBytes(state)
    tensors = _Sampler(cell.batches(batches), lambda: (tracker.live(), heap_bytes(), rss_bytes()))
    with tracker:
        cell.epoch(tensors)
    live, heap, rss = (list(x) for x in zip(*tensors.trace))
    growth = slope_per_step(heap) if heap[0] is not None else slope_per_step(live)
    return {"peak_memory_bytes": tracker.peak, "memory_growth_bytes_per_step": growth,
            "tensor_growth_bytes_per_step": slope_per_step(live), "rss_growth_bytes_per_step": slope_per_step(rss),
            "memory_trace_bytes": heap if heap[0] is not None else live}


def _measure_cuda(cell, batches: list) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sampler = _Sampler(cell.batches(batches), torch.cuda.memory_allocated)
    cell.epoch(sampler)
    torch.cuda.synchronize()
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "memory_growth_bytes_per_step": slope_per_step(sampler.trace),
            "tensor_growth_bytes_per_step": slope_per_step(sampler.trace),
            "rss_growth_bytes_per_step": None, "memory_trace_bytes": sampler.trace}
