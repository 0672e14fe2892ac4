"""The memory pass: peak bytes and growth in bytes per step.

CUDA: the caching allocator's own statistics (`max_memory_allocated` after a reset for the peak,
`memory_allocated` at each step boundary for the trace).

CPU: two deterministic figures and one noisy one.
* tensor bytes as the CPU allocator hands them out: every allocation and free it reports to the profiler
  (`profile_memory=True`), the kernels' own scratch included (a GRU under `inference_mode` reaches the
  dispatcher as one operator, and its gate buffers are never any operator's output), on top of the cell's
  state from before the pass. The peak is `peak_memory_bytes`; `allocator_counter_peak_bytes` is the same
  peak read from the allocator's own running counter, a cross-check of the pairing of records.
* native heap bytes in use (glibc `mallinfo2`): tensors *and* what autograd keeps on the host. Training
  with `running += loss` frees each step's activations at `backward()`, so only graph nodes pile up, and
  only this figure sees them. Its slope is `memory_growth_bytes_per_step` on CPU. It is read in an epoch
  of its own, without the profiler, whose records live on the same heap.
* process RSS, noisy (pages, not bytes), reported as a second figure.

Growth is the least-squares slope over the step boundaries, not last-minus-first.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from reports.stats import growth_per_step


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
    """The process's resident set, from /proc/self/statm, kept open (read at each step boundary of a pass: opening it
    each time costs tens of microseconds); None where there is no such file."""
    global _STATM
    pid = os.getpid()
    try:
        if _STATM is None or _STATM[0] != pid:  # first call, or a forked child: its own /proc/self
            _STATM = (pid, os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_STATM[1], 128, 0).split()[1]) * _PAGE_SIZE
    except (OSError, AttributeError):  # no /proc, or no os.pread
        return None


_STATM: tuple[int, int] | None = None  # (pid, descriptor of its /proc/self/statm)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def slope_per_step(trace: list) -> float:
    """Least-squares slope over the step boundaries from the end of the first step on: before it the
    loop's locals (last batch, last loss) do not exist yet, which would read as one step of growth.
    `reports.stats.growth_per_step` fits it, with its standard error."""
    return growth_per_step(trace)[0]


def slope_se_per_step(trace: list) -> float:
    """The standard error of `slope_per_step`."""
    return growth_per_step(trace)[1]


class _Roots:
    """The storages the cell holds before the pass (model state, staged batches, gradients, optimizer state):
    allocated before the profiler started, so the allocator's event stream never shows them, nor their frees.
    Weak references: `live()` counts those still alive without keeping any alive."""

    def __init__(self, tensors):
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                self.storages.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))

    def live(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())


class AllocatorLedger:
    """Every CPU allocation and free of the pass as the allocator reports it to the profiler (`[memory]`
    records), so tensors that never pass the dispatcher (a fused kernel's scratch, e.g. `aten::gru` under
    `inference_mode`, which reaches a dispatch mode as one operator) are counted too. No dispatch mode runs
    during the pass: one would keep Python references to intermediates and perturb the very peak it reads.

    `mark()` at a step boundary records a named profiler event (ordered with the memory records by their
    timestamps) and the bytes of the pre-pass storages still alive there. After the pass, `steps()` gives per
    step: those bytes at its start, and the bytes the pass had allocated and not freed at its start and at its
    most. Two ledgers of the same records: ours pairs each free with an allocation of this pass by pointer (a
    block from before the pass being freed, say by the garbage collector, is no concern of the pass), the
    allocator's is its own running counter (`total_allocated`, c10's CPU memory reporter), taken relative to
    its value before the pass's first record.
    """

    MARK = "loopmark::step_boundary"

    def __init__(self, roots=()):
        self.roots = _Roots(tree_flatten(list(roots))[0])
        self.root_bytes: list[int] = []
        self.results = None

    def __enter__(self):
        with _quiet_stderr():  # the profiler's C++ side announces its start on stderr
            _start_memory_profiler()
        return self

    def __exit__(self, *exc):
        if self.results is None:
            with _quiet_stderr():
                self.results = torch._C._autograd._disable_profiler()
        return False

    def mark(self) -> int:
        """Call at a step boundary; returns the live tensor bytes the boundary will be credited with once the
        pass is over (the pre-pass part now; the pass's own part is read from the records afterwards)."""
        self.root_bytes.append(self.roots.live())
        with torch.profiler.record_function(self.MARK):
            pass
        return self.root_bytes[-1]

    def steps(self) -> list[dict]:
        """Per step (from one mark to the next; the last runs to the end of the pass): `roots` (pre-pass
        bytes alive at its start), `start`/`peak` (bytes allocated by the pass and alive at its start / at
        most, by our ledger) and `counter_start`/`counter_peak` (the same by the allocator's counter)."""
        ledger: dict[int, int] = {}
        held = counter = 0
        counter_base = None
        steps: list[dict] = []
        peak = counter_peak = None  # the step under way's (None before the first mark), kept here, written at its end
        for name, fields in _records(self.results.experimental_event_tree()):
            if fields is None:
                if name == self.MARK:
                    if steps:
                        steps[-1]["peak"], steps[-1]["counter_peak"] = peak, counter_peak
                    steps.append({"roots": self.root_bytes[len(steps)], "start": held, "peak": held,
                                  "counter_start": counter, "counter_peak": counter})
                    peak, counter_peak = held, counter
                continue
            # each field read is a call into the profiler's bindings, made once; a CPU record's device is `cpu` itself
            device = fields.device
            if device != _CPU and device.type != "cpu":
                continue
            size, ptr, total = fields.alloc_size, fields.ptr, fields.total_allocated
            if size > 0:
                ledger[ptr] = size
                held += size
            elif ptr in ledger:
                held -= ledger.pop(ptr)
            if counter_base is None:
                counter_base = total - size
            counter = total - counter_base
            if peak is not None:
                if held > peak:
                    peak = held
                if counter > counter_peak:
                    counter_peak = counter
        if steps:
            steps[-1]["peak"], steps[-1]["counter_peak"] = peak, counter_peak
        return steps


_CPU = torch.device("cpu")


def _start_memory_profiler() -> None:
    """torch's profiler on the CPU, recording the allocator's reports and the user scopes (`record_function`, the step
    marks) only: what `torch.profiler.profile(profile_memory=True)` records, less an event per operator, which costs
    several times a small operator's own time and would be walked and dropped afterwards."""
    from torch._C._profiler import ProfilerActivity, ProfilerConfig, ProfilerState, RecordScope, _ExperimentalConfig

    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    torch._C._autograd._prepare_profiler(config, {ProfilerActivity.CPU})
    torch._C._autograd._enable_profiler(config, {ProfilerActivity.CPU}, {RecordScope.USER_SCOPE})


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null for the block: the profiler's start and stop print lines (and, with
    no GPU, an 'ERROR' about counting devices) from C++, where Python's sys.stderr cannot catch them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _records(tree) -> list[tuple[str, object]]:
    """The profiler's records in time order: (None, allocation fields) for a `[memory]` record, (name, None)
    for any other; an allocation is recorded as a child of the scope (`record_function`) it was made in."""
    flat, stack, allocation = [], list(tree), torch._C._profiler._ExtraFields_Allocation
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields) is allocation:  # nearly every record: its name ("[memory]") is not read, it has no children
            flat.append((node.start_time_ns, None, fields))
            continue
        flat.append((node.start_time_ns, node.name, None))
        children = node.children
        if children:
            stack += children
    flat.sort(key=lambda r: r[0])
    return [(name, fields) for _, name, fields in flat]


def cpu_peaks(steps: list[dict]) -> tuple[int, int]:
    """(peak by our ledger, peak by the allocator's counter): pre-pass bytes alive at a step's start plus the
    pass's own bytes at their most within it, the largest over the steps.

    The first step is left out where there are others: the pre-pass storages it frees (last epoch's
    gradients, freed by `zero_grad(set_to_none=True)`) vanish without a record, so its figure would count them
    twice; the blocks that replace them are allocated under the profiler, and from the second step on every
    free is recorded. Pre-pass bytes can only fall within a step, so counting them at its start never
    undercounts."""
    measured = steps[1:] or steps
    return (max(s["roots"] + s["peak"] for s in measured),
            max(s["roots"] + s["counter_peak"] for s in measured))


class _Sampler:
    """Yields the batches; samples memory at each step boundary (not a timed pass)."""

    def __init__(self, batches, sample):
        self.batches, self.sample, self.trace = batches, sample, []

    def __len__(self) -> int:  # a loop may ask `len(run.batches)`, as it asks `len(train_loader)`
        return len(self.batches)

    @property
    def sampler(self):  # a distributed loop's `run.batches.sampler.set_epoch(epoch)`
        return getattr(self.batches, "sampler", None)

    def __iter__(self):
        self.trace = []  # a loop that peeks at a batch first (`next(iter(loader))`): its real pass is traced
        for batch in self.batches:
            self.trace.append(self.sample())
            yield batch


def measure_memory(cell, batches: list) -> dict:
    """Peak bytes and growth per step over one epoch of `batches` (the cell is already warmed up).

    On CPU the loop runs the epoch twice: once bare, for the C heap and RSS at each step boundary, then once
    under the profiler, for the allocator's records. The profiler keeps its records on the C heap, a few
    hundred bytes each, so in the same epoch it would read as growth of the heap."""
    if cell.device.type == "cuda":
        return _measure_cuda(cell, batches)
    bare = _Sampler(cell.batches(batches), lambda: (heap_bytes(), rss_bytes()))
    cell.epoch(bare)
    heap, rss = [h for h, _ in bare.trace], [r for _, r in bare.trace]
    state = [*cell.model.parameters(), *cell.model.buffers(), batches, [p.grad for p in cell.model.parameters()],
             [list(o.state.values()) for o in cell.optimizers], cell.device_tensors()]
    ledger = AllocatorLedger(state)
    with ledger:
        cell.epoch(_Sampler(cell.batches(batches), ledger.mark))
    steps = ledger.steps()
    peak, counter_peak = cpu_peaks(steps)
    live = [s["roots"] + s["start"] for s in steps]
    growth, growth_se, _ = growth_per_step(heap if heap[0] is not None else live)
    return {"peak_memory_bytes": peak, "allocator_counter_peak_bytes": counter_peak,
            "memory_growth_bytes_per_step": growth, "memory_growth_se_bytes_per_step": growth_se,
            "tensor_growth_bytes_per_step": slope_per_step(live),
            "rss_growth_bytes_per_step": slope_per_step(rss),
            "memory_trace_bytes": heap if heap[0] is not None else live}


def _measure_cuda(cell, batches: list) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sampler = _Sampler(cell.batches(batches), torch.cuda.memory_allocated)
    cell.epoch(sampler)
    torch.cuda.synchronize()
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "memory_growth_bytes_per_step": slope_per_step(sampler.trace),
            "memory_growth_se_bytes_per_step": slope_se_per_step(sampler.trace),
            "tensor_growth_bytes_per_step": slope_per_step(sampler.trace),
            "allocator_counter_peak_bytes": torch.cuda.max_memory_allocated(),
            "rss_growth_bytes_per_step": None, "memory_trace_bytes": sampler.trace}
