"""`loopmark trace`: syncs, ops, step time, memory and kept autograd graphs per step of an unmodified training script.

The script runs in this process as `python SCRIPT.py ARGS` (or `python -m MODULE ARGS`) would run it: `__name__` is
`"__main__"`, `sys.argv` is the script's, the script's directory comes first on `sys.path`. Nothing is added to it.

**Steps.** A step ends at `optimizer.step()`, seen through torch's global optimizer step post-hook. With several
optimizers a step is one round of them: it ends at the step of the optimizer that stepped first last (a GAN's
generator after its discriminator, a WGAN's generator after five critic steps). The first round is one step: it ends
once every optimizer the script has made by then has stepped (`FIRST_ROUND_LIMIT` optimizer steps at most); an
optimizer stepping for the first time later on becomes the end of the round from then. Gradient accumulation needs
nothing: the backward passes of the micro-batches fall in the step that consumes them. A `GradScaler` that finds
inf/NaN gradients skips `optimizer.step()`; `GradScaler.step()` is watched too, so a skipped step still ends a step
(`skipped_steps`). A step runs from one boundary to the next: what a script does after `optimizer.step()` (a log line
with `loss.item()`, a scheduler step) falls in the next step.

**Passes.** After `warmup` steps, four passes of `steps` steps each, one after the other on the running script, so
that no instrument distorts another's figure (as `loopmark run`'s passes):

1. *count*: host-device syncs with their sites (`bench.syncs.SyncCounter`, the counter `loopmark run` uses) and
   dispatched operators, per step; on a GPU also `torch.cuda.set_sync_debug_mode("warn")`'s count;
2. *audit*: what each optimizer step consumed against what its backward passes produced (`bench.audit`), and the
   graphs evaluation builds and keeps: the verdict. Its hooks on the parameters are removed when the pass ends, and
   its global hooks, set when the tracer is armed (none can be added during a step), only look at a flag outside it;
3. *time*: each step's time (`perf_counter_ns`; on a GPU one CUDA event per boundary, read after the pass, so no
   sync is added), and the C heap and RSS at each boundary (the host's growth per step), read between the timed
   intervals. No torch mode is on: what the tracer does within a step (its hooks on `backward()` and the optimizer
   step) costs microseconds, so the step time is the script's;
4. *memory*: the peak (CPU: the allocator's own records, `bench.memory.AllocatorLedger`; CUDA: the caching allocator's
   peak) and the tensor bytes alive at each boundary.

Then the script is stopped: an exception of loopmark's own (a `BaseException`, which `except Exception` does not
catch) is raised from the step hook, so the script's `finally` blocks and context managers run and its DataLoader
workers end. In every pass: the loss of each backward pass is checked for inf/NaN (on a GPU without a sync: the flags
stay on the device until the end), and each loss's autograd graph carries a sentinel (a pre-hook on its `grad_fn`);
a graph still alive `GRAPH_LAG` steps after its backward pass is one the script keeps across steps (`running += loss`).

**Evaluation between training steps** is left out of the step: from `.eval()` on a module holding all parameters of
an optimizer to its `.train()` (or the next backward pass), syncs, operators and time are counted apart
(`eval_*` fields); the memory pass's peak includes it. Validation that never calls `.eval()` counts in its step.

**Without a GPU the count is the CUDA count**: the script runs as on a machine with one (`bench.standin`).

**Under torchrun** every rank traces its own process: on the stand-in the script's nccl runs on gloo and DDP gets no
device ids; the count pass counts each step's collectives (`bench.distributed.CollectiveCounter`), the audit judges
gradients as DDP averages them and compares a checksum of the ranks' parameters after each step (they differ:
`broken`); each rank publishes its record and rank 0 writes them, a cell per rank (`bench.trace_ranks`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
import math
import multiprocessing
import os
import runpy
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten

from bench import distributed, launcher
from bench.audit import Audit
from bench.audit import verdict as audit_verdict
from bench.cell import compiled_frames
from bench.memory import AllocatorLedger, cpu_peaks, heap_bytes, rss_bytes, slope_per_step
from bench.standin import CudaArguments, CudaEntryPoints, cuda_shims, is_cuda
from bench.syncs import (
    STAND_IN,
    CudaDebugSyncs,
    SyncCounter,
    is_sync_warning,
    optimizer_device_state,
    site_details,
    storage_key,
)
from bench.target import Target
from bench.timing import LoadWatch
from bench.trace_ranks import collective_timeout
from reports import stats
from reports.results import TRACE_VARIANT, CellSpec, Measurement, record, site_code, trace_device
from reports.table import format_table
from reports.units import human_bytes

PHASES = ("count", "audit", "time", "memory")
DEFAULT_STEPS, DEFAULT_WARMUP = 20, 5
GRAPH_LAG = 2  # a loss's graph still alive this many step boundaries after its step ended is kept across steps
TOP_SITES = 10  # the sync sites `loopmark trace` prints, most syncs first
FIRST_ROUND_LIMIT = 100  # optimizer steps the first round waits for an optimizer the script made to step


class _Stop(BaseException):
    """Raised from the optimizer step hook once the passes are done: it unwinds the script like any exception (its
    `finally` blocks run, DataLoader workers end), and `except Exception` in the script does not catch it."""


class _Sentinel:
    """Hung on a loss's autograd graph (a pre-hook of its `grad_fn`): alive exactly as long as that graph."""

    __slots__ = ("__weakref__",)

    def __call__(self, grad_outputs):
        return None


def _modes_on() -> bool:
    """Whether a torch function or dispatch mode is on."""
    return bool(torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


@contextlib.contextmanager
def _unobserved():
    """Our own tensor operations, hidden from every mode (the counter, the device mapping)."""
    with torch._C.DisableTorchFunction(), _disable_current_modes():
        yield


def _live_tensors() -> list[torch.Tensor]:
    """Every tensor the garbage collector knows (type() only: no object's __class__ is looked up), less the compiler's
    stand-ins: `torch.compile` keeps FakeTensors (shapes and dtypes, no memory) in its caches and guards, hundreds of
    them with a cold cache, whose nominal sizes are not the script's memory. While a tracer runs, the objects made
    before the script (torch's, loopmark's: a few hundred thousand) are frozen, out of the collector's sight, so this
    sweeps what the script made; the objects are sifted in C (`map`, `compress`)."""
    objects = gc.get_objects()
    return list(itertools.compress(objects, map(_TensorKinds().__getitem__, map(type, objects))))


class _TensorKinds(dict):
    """{type: whether its objects are tensors of memory of their own}, filled in as types are first met."""

    def __missing__(self, kind: type) -> bool:
        from torch._subclasses.fake_tensor import FakeTensor

        self[kind] = is_tensor = issubclass(kind, torch.Tensor) and not issubclass(kind, FakeTensor)
        return is_tensor


def _in_process_group() -> bool:
    """Whether the script made this process a rank of a process group of several."""
    return distributed.active() and dist.get_world_size() > 1


def _rank_mean(vector: torch.Tensor) -> torch.Tensor:
    """The mean of `vector` over the ranks (the audit's reduction: what DDP makes of each rank's gradient)."""
    with _unobserved():
        out = vector.clone()
        dist.all_reduce(out)
        return out / dist.get_world_size()


# -- the tracer ---------------------------------------------------------------------------------------------

_LoaderIter = torch.utils.data.dataloader._BaseDataLoaderIter
_ACTIVE: list = []  # the tracer running in this process, if any (for the fork handler)


def _after_fork_in_child() -> None:
    """A DataLoader worker forked during a trace: it runs the dataset without loopmark's modes (nothing it does is
    on the device, and the counter's bookkeeping would only slow it down)."""
    if _ACTIVE:
        _ACTIVE[0].disarmed = True
        with contextlib.suppress(Exception):
            while torch._C._len_torch_function_stack():
                torch._C._pop_torch_function_stack()
            while torch._C._len_torch_dispatch_stack():
                torch._C._pop_torch_dispatch_stack()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _FilteredStderr:
    """File descriptor 2 goes to a temporary file while entered; on exit what was written is passed on, less the lines
    holding one of `drop`: notices the profiler's C++ side prints (a block allocated before the memory pass freed in
    it), which Python cannot catch and which say nothing about the script."""

    def __init__(self, *drop: bytes):
        self.drop = drop
        self.file = None

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.file is None:
            return False
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        lines = self.file.read().splitlines(keepends=True)
        self.file.close()
        self.file = None
        kept = b"".join(line for line in lines if not any(d in line for d in self.drop))
        if kept:
            os.write(2, kept)
        return False


class _Clock:
    """Timestamps: `perf_counter_ns` on CPU; on CUDA a recorded event, read once the pass is over."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def now(self):
        if not self.cuda:
            return time.perf_counter_ns()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else (b - a) / 1e9


@dataclass
class _Eval:
    """Evaluation between training steps, counted apart."""

    passes: Counter = field(default_factory=Counter)  # per pass
    syncs: int = 0
    ops: int = 0
    debug_syncs: int = 0
    sites: Counter = field(default_factory=Counter)
    site_kinds: Counter = field(default_factory=Counter)
    time_s: float = 0.0


class Tracer:
    """Watches a script through torch's hooks; `figures()` once the script has ended."""

    def __init__(self, steps: int, warmup: int, device: torch.device | None = None, say=None):
        if steps < 1 or warmup < 0:
            raise ValueError("steps must be >= 1 and warmup >= 0")
        self.steps, self.warmup = steps, warmup
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.say = say or (lambda text: None)
        self.counter = SyncCounter(self.device if self.cuda else STAND_IN)
        self.counting = False  # the counter's modes are on
        self.reached = False  # the script put tensors on the stand-in (seen when the counter goes off)
        self.mapping: CudaArguments | None = None  # the count pass's (and the warm-up's) device mapping
        self.entry = CudaEntryPoints()  # the time and memory passes'
        self.phase = "setup"  # setup (before the first step), warmup, count, time, memory, done
        self.steps_run = 0  # step boundaries so far
        self.done: Counter = Counter()  # measured steps per pass
        self.disarmed = False
        self.notes: list[str] = []
        self.stopped = False  # the passes are done and the script was stopped
        # optimizers and rounds
        self.optimizers: list[weakref.ref] = []
        self.param_ids: list[set[int]] = []
        self.optimizer_names: list[str] = []
        self.anchor: weakref.ref | None = None
        self.step_counts: Counter = Counter()
        self.made: weakref.WeakSet = weakref.WeakSet()  # the optimizers the script made
        self.waiting: weakref.WeakSet = weakref.WeakSet()  # the first round: those made that have not stepped yet
        self.first_round_steps = 0
        self.skipped: Counter = Counter()  # per pass: steps whose optimizer.step() a GradScaler skipped
        # count pass
        self.base: dict = {}
        self.syncs_by_step: list[float] = []
        self.ops_by_step: list[float] = []
        self.debug: CudaDebugSyncs | None = None
        self.debug_by_step: list[int] = []
        self.data_ops = 0  # operators inside DataLoader iteration (collation, unpickling a worker's batch)
        self.data_ops_counted = 0  # ... before the count pass
        self.counted: dict = {}
        # time pass
        self.clock = _Clock(self.cuda)
        self.step_marks: list[tuple] = []  # (start, end, [(eval start, eval end)])
        self.step_times: list[float] = []
        self.load: LoadWatch | None = None  # around the whole pass, outside its steps: was the machine busy?
        self.frames = 0  # dynamo's compiled frames when the last timed step ended
        self.compiled_steps: list[int] = []  # timed steps in which torch.compile compiled
        self.start_mark = None
        self.evals_in_step: list[tuple] = []
        self.heap: list = []
        self.rss: list = []
        # memory pass
        self.ledger: AllocatorLedger | None = None
        self.stderr: _FilteredStderr | None = None
        self.allocated: list[int] = []
        self.memory: dict = {}
        # audit pass: what each optimizer step consumed against what backward produced (bench.audit), and graphs that
        # evaluation builds and keeps
        self.audit = Audit(step_number=lambda: self.steps_run + 1, paused=True, reduce=self._rank_mean)
        self.eval_hook = None
        self.eval_graphs: list[tuple[int, weakref.ref]] = []
        self.eval_retained_steps: list[int] = []
        # in every pass
        self.eval = _Eval()
        self.in_eval = False
        self.eval_mark: tuple | None = None
        self.graphs: list[tuple[int, weakref.ref]] = []
        self.retained_steps: list[int] = []
        self.finite_flags: list[tuple[int, torch.Tensor]] = []
        self.nonfinite_steps: list[int] = []
        self.backward_passes = 0
        # a rank of a process group: collectives per step (count pass), the ranks' parameters compared (audit pass)
        self.collectives: distributed.CollectiveCounter | None = None
        self.collectives_seen: distributed.CollectiveCounter | None = None
        self.collectives_by_step: list[int] = []
        self.comm_bytes_by_step: list[int] = []
        self.collected: dict = {}
        self.ranks_differ: tuple[int, int] | None = None  # (step, rank) of the first step after which they differed
        self.replicas: list[weakref.ref] = []  # the DistributedDataParallel modules the script made, in order
        self.sampler_epochs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sampler -> (reads, its epoch)
        self.same_order: str | None = None  # a shuffling DistributedSampler that read an epoch as the one before
        self._saved: list[tuple[object, str, object]] = []
        self._hook = None
        self._train_depth = 0
        self._froze = False  # the objects made before the script are frozen (gc.freeze) while it runs

    # -- arming and disarming ---------------------------------------------------------------------------

    def __enter__(self):
        if _ACTIVE:
            raise RuntimeError("a trace is already running in this process")
        _ACTIVE.append(self)
        try:
            self._arm()
        except BaseException:
            self._disarm()
            raise
        return self

    def __exit__(self, *exc):
        self.finish()
        return False

    def _arm(self) -> None:
        patches = ([] if self.cuda else cuda_shims() + self.entry.factory_shims()) + self._process_group_shims()
        patches += [(torch.autograd, "backward", self._backward(torch.autograd.backward)),
                    (torch.nn.Module, "train", self._train(torch.nn.Module.train)),
                    (torch.amp.GradScaler, "step", self._scaler_step(torch.amp.GradScaler.step)),
                    (torch.optim.Optimizer, "__init__", self._made(torch.optim.Optimizer.__init__)),
                    (_LoaderIter, "__next__", self._next_batch(_LoaderIter.__next__))]
        self._saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, value in patches:
            setattr(owner, name, value)
        # paused until the audit pass (global step hooks cannot be added during a step); its post hook runs before the
        # tracer's, which may end the audit pass at that very step
        self.audit.__enter__()
        self._hook = register_optimizer_step_post_hook(self._on_optimizer_step)
        if not gc.get_freeze_count():  # `_live_tensors` sweeps what the script made, not torch's and loopmark's objects
            importlib.import_module("torch._dynamo")  # what the first optimizer.step() imports (100,000 objects)
            gc.freeze()
            self._froze = True
        if not self.cuda:  # the counter tracks what lands on the stand-in from the start
            self._counter_on()
        self.phase = "warmup"
        if self.warmup == 0:
            self._begin("count")

    def finish(self) -> None:
        """After the script: close the pass under way (its complete steps count) and undo every change."""
        try:
            if self.in_eval:
                self._eval_end()
            if self.phase in PHASES:
                self._end(self.phase)
        finally:
            self._disarm()

    def _stderr_back(self) -> None:
        stderr, self.stderr = self.stderr, None
        if stderr is not None:
            stderr.__exit__(None, None, None)

    def _disarm(self) -> None:
        self._collectives_off()
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                self.ledger.__exit__(None, None, None)
            self.ledger = None
        self._stderr_back()
        self._eval_unhook()
        self.audit.__exit__(None, None, None)
        if self._froze:
            gc.unfreeze()
            self._froze = False
        self._counter_off(remap=False)
        self.counter.logs.__exit__(None, None, None)  # armed when an optimizer was made, maybe before any count
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _counter_on(self) -> None:
        self.counter.__enter__()
        self.counting = True
        if not self.cuda:
            self.entry.off()
            self.mapping = self.counter.arguments = CudaArguments(STAND_IN)

    def _counter_off(self, remap: bool = True) -> None:
        """The counter's modes off (and its device mapping, which comes back meaning `cpu`, at the entry points that
        take a device: `CudaEntryPoints`)."""
        if self.debug is not None:
            self.debug.__exit__(None, None, None)
            for w in self.debug.caught:  # the script's own warnings, which the debug mode's recording caught
                if not is_sync_warning(w):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
            self.debug = None
        self.mapping = self.counter.arguments = None
        if self.counting:
            tracker = self.counter.tracker
            self.reached = self.reached or bool(len(tracker.tracked) or tracker.storages)
            self.counter.__exit__(None, None, None)
            self.counting = False
        if remap and not self.cuda:
            self.entry.on(torch.device("cpu"))
        else:
            self.entry.off()

    def _modes_on_top(self) -> bool:
        """Whether loopmark's modes are the innermost ones, so that they can be taken off here."""
        functions, dispatch = _get_current_function_mode_stack(), _get_current_dispatch_mode_stack()
        top = self.counter._modes[0] if self.counting else None
        top_dispatch = self.collectives or self.counter._modes[1]
        return (top is None or (bool(functions) and functions[-1] is top)) and (
            not self.counting or (bool(dispatch) and dispatch[-1] is top_dispatch))

    def _collectives_off(self) -> None:
        if self.collectives is not None:
            self.collectives.__exit__(None, None, None)
            self.collectives_seen, self.collectives = self.collectives, None

    # -- a rank of a process group on the stand-in ----------------------------------------------------------

    def _process_group_shims(self) -> list[tuple[object, str, object]]:
        """The DistributedDataParallel modules the script makes are kept (their ranks' parameters are replicas, which
        the audit compares). On the stand-in, the script's `init_process_group("nccl")` runs on gloo (there is no GPU
        for nccl, and the stand-in's tensors are CPU tensors), and DDP takes a module on the stand-in with the
        `device_ids` and `output_device` the script gives it for its GPU (on the CPU they must be None)."""
        if not dist.is_available():
            return []
        from torch.distributed import distributed_c10d
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DistributedSampler

        tracer, init, ddp_init = self, distributed_c10d.init_process_group, DistributedDataParallel.__init__
        sampler_iter = DistributedSampler.__iter__

        def read_epoch(sampler):
            if not tracer.disarmed:
                tracer._sampler_read(sampler)
            return sampler_iter(sampler)

        def init_process_group(backend=None, *args, **kwargs):
            if not tracer.cuda and isinstance(backend, str) and "nccl" in backend:
                tracer.notes.append(f"the script's init_process_group({backend!r}) ran on gloo: nccl needs a GPU")
                backend = "gloo"
            if not tracer.cuda and is_cuda(kwargs.get("device_id")):
                kwargs = {k: v for k, v in kwargs.items() if k != "device_id"}
            return init(backend, *args, **collective_timeout(args, kwargs))

        def __init__(ddp, module, device_ids=None, output_device=None, *args, **kwargs):
            if not tracer.cuda and all(p.device.type == "cpu" for p in module.parameters()):  # the stand-in: CPU
                device_ids = output_device = None
            ddp_init(ddp, module, device_ids, output_device, *args, **kwargs)
            tracer.replicas.append(weakref.ref(ddp))
        __init__.__wrapped__ = ddp_init
        read_epoch.__wrapped__ = sampler_iter
        shims = [(DistributedDataParallel, "__init__", __init__), (DistributedSampler, "__iter__", read_epoch)]
        if not self.cuda or os.environ.get(launcher.TIMEOUT_ENV):
            shims += [(distributed_c10d, "init_process_group", init_process_group),
                      (dist, "init_process_group", init_process_group)]
        return shims

    def _sampler_read(self, sampler) -> None:
        """A DistributedSampler begins an epoch (the DataLoader's iterator asks it for its order). One that shuffles
        orders each epoch by `seed + epoch`: read again with the epoch it had the time before, it gives the same
        order again, every epoch (the script never calls `sampler.set_epoch(epoch)`): `different`, as `loopmark
        check` judges a distributed loop that draws its epochs so."""
        reads, epoch = self.sampler_epochs.get(sampler, (0, None))
        now = getattr(sampler, "epoch", None)
        if reads and now == epoch and getattr(sampler, "shuffle", False) and self.same_order is None:
            dataset = type(getattr(sampler, "dataset", None)).__name__
            given = "was never given set_epoch" if not now else f"was given set_epoch({now}) again"
            self.same_order = (f"the DistributedSampler of the {dataset} {given}: every epoch reads the same order "
                               f"(its epoch {reads + 1}, at step {self.steps_run + 1}, read the order of the one "
                               "before; call sampler.set_epoch(epoch) before each epoch)")
        self.sampler_epochs[sampler] = (reads + 1, now)

    def _replicated(self) -> bool:
        """Whether the script trains DDP replicas on several ranks (each rank's parameters the same)."""
        return any(ref() is not None for ref in self.replicas) and _in_process_group()

    def _rank_mean(self, vector: torch.Tensor) -> torch.Tensor:
        """The audit's reduction on DDP replicas: the mean over the ranks, what DDP makes of each rank's gradient
        (the same collective on every rank, which all hold the same parameters)."""
        return _rank_mean(vector) if self._replicated() else vector

    def _compare_ranks(self) -> None:
        """After a step of the audit pass: do the ranks' parameters still agree? (a checksum of each parameter,
        gathered from every rank: DDP keeps them bitwise the same; a gradient one rank did not share makes them
        differ from then on)"""
        if self.ranks_differ is not None or not self._replicated():
            return
        with _unobserved():
            params = [p for ref in self.replicas if ref() is not None for p in ref().module.parameters()]
            if not params:
                return
            mine = torch.stack([p.detach().double().sum() for p in params]
                               + [p.detach().double().square().sum() for p in params])
            everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, mine)
        other = next((r for r, theirs in enumerate(everyone) if not torch.equal(theirs, mine)), None)
        if other is not None:
            self.ranks_differ = (self.steps_run, other)

    # -- the script's events -------------------------------------------------------------------------------

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.disarmed:
            return
        self.step_counts[id(optimizer)] += 1
        self._stepped(optimizer, skipped=False)

    def _scaler_step(self, original):
        tracer = self

        def step(scaler, optimizer, *args, **kwargs):
            before = tracer.step_counts[id(optimizer)]
            out = original(scaler, optimizer, *args, **kwargs)
            if not tracer.disarmed and tracer.step_counts[id(optimizer)] == before:
                tracer._stepped(optimizer, skipped=True)  # the scaler found inf/NaN gradients: a step all the same
            return out
        return step

    def _made(self, original):
        """Every optimizer the script makes (its class's `__init__` calls `Optimizer.__init__`): the first round waits
        for each of them to step. By then the script has imported its framework: the counter's `self.log` watch
        (`bench.frameworks.LogCalls`), on since before the script ran, is armed."""
        tracer = self

        def __init__(optimizer, *args, **kwargs):
            original(optimizer, *args, **kwargs)
            if not tracer.disarmed:
                tracer.made.add(optimizer)
                tracer.counter.logs.arm()
        __init__.__wrapped__ = original
        return __init__

    def _next_batch(self, original):
        """The operators of DataLoader iteration are the input pipeline's, not the step's: the main process unpickles
        a worker's batch when it arrives, which with several workers is not always in the step that uses it."""
        tracer = self

        def __next__(iterator):
            if not tracer.audit.paused and not tracer.in_eval:
                tracer.audit.batch()
            if not tracer.counting or tracer.in_eval:
                return original(iterator)
            before = tracer.counter.ops
            try:
                return original(iterator)
            finally:
                tracer.data_ops += tracer.counter.ops - before
        return __next__

    def _stepped(self, optimizer, skipped: bool) -> None:
        if not any(ref() is optimizer for ref in self.optimizers):
            first_round = not self.optimizers or optimizer in self.waiting
            if not self.optimizers:  # the first round lasts until every optimizer made so far has stepped once
                self.waiting = weakref.WeakSet(o for o in self.made if o is not optimizer)
            self.waiting.discard(optimizer)
            self.optimizers.append(weakref.ref(optimizer))
            self.param_ids.append({id(p) for group in optimizer.param_groups for p in group["params"]})
            self.optimizer_names.append(type(optimizer).__name__)
            self.anchor = weakref.ref(optimizer)
            if self.phase in PHASES and not first_round:
                self.notes.append(f"a {type(optimizer).__name__} stepped for the first time at step "
                                  f"{self.steps_run + 1}, after the warm-up; from then on a step ends at its step()")
        if self.waiting:  # within the first round: no boundary before the last of the optimizers has stepped
            self.first_round_steps += 1
            if self.first_round_steps < FIRST_ROUND_LIMIT:
                return
            names = ", ".join(sorted({type(o).__name__ for o in self.waiting}))
            self.notes.append(f"the script made optimizer(s) ({names}) that had not stepped after {FIRST_ROUND_LIMIT} "
                              "optimizer steps: the first step ended without them")
            self.waiting = weakref.WeakSet()
        if self.anchor is not None and self.anchor() is optimizer:
            self._boundary(skipped)

    def _backward(self, original):
        tracer = self

        def backward(tensors, *args, **kwargs):
            if not tracer.disarmed:
                tracer._saw_backward(tensors)
            return original(tensors, *args, **kwargs)
        backward.__wrapped__ = original
        return backward

    def _saw_backward(self, tensors) -> None:
        if self.in_eval:
            self._eval_end()
        loss = tensors if isinstance(tensors, torch.Tensor) else next(iter(tensors or ()), None)
        if not isinstance(loss, torch.Tensor):
            return
        step = self.steps_run + 1
        self.backward_passes += 1
        # hidden from the modes on (the counter's); with none (the time and memory passes) hiding costs more than the
        # rest: this runs in the steps the time pass times
        with _unobserved() if _modes_on() else contextlib.nullcontext():
            if loss.grad_fn is not None:
                sentinel = _Sentinel()
                loss.grad_fn.register_prehook(sentinel)
                self.graphs.append((step, weakref.ref(sentinel)))
            if loss.numel() == 1 and loss.is_floating_point():
                if loss.is_cuda:  # read after the passes: no sync now
                    self.finite_flags.append((step, torch.isfinite(loss.detach()).all()))
                elif not math.isfinite(loss.detach().item()):
                    self.nonfinite_steps.append(step)

    def _train(self, original):
        tracer = self

        def train(module, mode=True):
            tracer._train_depth += 1
            try:
                out = original(module, mode)
            finally:
                tracer._train_depth -= 1
            if tracer._train_depth == 0 and not tracer.disarmed and tracer._holds_an_optimizer(module):
                if not mode and not tracer.in_eval:
                    tracer._eval_begin(module)
                elif mode and tracer.in_eval:
                    tracer._eval_end()
            return out
        train.__wrapped__ = original
        return train

    def _holds_an_optimizer(self, module) -> bool:
        if not self.param_ids:
            return False
        ids = {id(p) for p in module.parameters()}
        return any(params and params <= ids for params in self.param_ids)

    # -- evaluation, counted apart --------------------------------------------------------------------------

    def _eval_begin(self, module) -> None:
        self.in_eval = True
        if self.phase == "audit":  # a graph built in evaluation and still alive later is kept (no no_grad)
            self.eval_hook = module.register_forward_hook(self._eval_output)
        if self.phase in PHASES:
            self.eval.passes[self.phase] += 1
        if self.phase == "count":
            c = self.counter
            self.eval_mark = (c.syncs, c.ops, Counter(c.sites), Counter(c.site_kinds),
                              self.debug.count if self.debug else 0)
        elif self.phase == "time":
            self.eval_mark = (self.clock.now(),)

    def _eval_output(self, module, args, output) -> None:
        root = next((t for t in tree_flatten(output)[0]
                     if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)
        if root is not None:
            sentinel = _Sentinel()
            with _unobserved():
                root.grad_fn.register_prehook(sentinel)
            self.eval_graphs.append((self.steps_run + 1, weakref.ref(sentinel)))

    def _eval_unhook(self) -> None:
        if self.eval_hook is not None:
            self.eval_hook.remove()
            self.eval_hook = None

    def _eval_end(self) -> None:
        self.in_eval = False
        self._eval_unhook()
        mark, self.eval_mark = self.eval_mark, None
        if mark is None:
            return
        if self.phase == "count" and len(mark) == 5:
            c = self.counter
            self.eval.syncs += c.syncs - mark[0]
            self.eval.ops += c.ops - mark[1]
            self.eval.sites.update(_difference(c.sites, mark[2]))
            self.eval.site_kinds.update(_difference(c.site_kinds, mark[3]))
            self.eval.debug_syncs += (self.debug.count if self.debug else 0) - mark[4]
        elif self.phase == "time" and len(mark) == 1:
            self.evals_in_step.append((mark[0], self.clock.now()))

    # -- steps and passes -------------------------------------------------------------------------------

    def _boundary(self, skipped: bool) -> None:
        if self.in_eval:
            self._eval_end()
        end = self.clock.now() if self.phase == "time" else None  # the step's end: the bookkeeping below is not its
        self.steps_run += 1
        self._check_graphs()
        phase = self.phase
        if phase == "done":
            raise _Stop
        if phase == "warmup":
            if self.steps_run >= self.warmup:
                self._begin("count")
            return
        self.skipped[phase] += skipped
        self.done[phase] += 1
        if phase == "audit":
            self._compare_ranks()
        last = self.done[phase] == self.steps
        if phase == "count":
            self._count_step()
        elif phase == "time":
            self._time_step(last, end)
        elif phase == "memory":
            self._memory_step(last)
        if last:
            if phase == "count" and not self._modes_on_top():
                self.notes.append("the script runs a torch mode of its own around its optimizer step: loopmark cannot "
                                  "switch its passes there, so it stopped after the count pass")
                self._end_count(self.done[phase])
                self.phase, self.stopped = "done", True
                raise _Stop
            self._end(phase)
            following = PHASES.index(phase) + 1
            if following == len(PHASES):
                self.phase, self.stopped = "done", True
                raise _Stop
            self._begin(PHASES[following])

    def _begin(self, phase: str) -> None:
        self.phase = phase
        n = self.steps
        if phase == "count":
            self.say(f"step {self.steps_run}: counting syncs and operators over {n} steps")
            if self.cuda:
                self._counter_on()
                self.debug = CudaDebugSyncs().__enter__()
            else:
                self._mark_device_tensors()
            if _in_process_group():  # on top of the counter's modes: taken off before them
                self.collectives = distributed.CollectiveCounter().__enter__()
                self._last_collectives = (0, 0)
            c = self.counter
            self.base = {"syncs": c.syncs, "ops": c.ops, "sites": Counter(c.sites), "site_kinds": Counter(c.site_kinds),
                         "kinds": Counter(c.kinds), "hazards": c.hazards, "hazard_sites": Counter(c.hazard_sites)}
            self._last = self._totals()
            self.data_ops_counted = self.data_ops
        elif phase == "audit":
            self.say(f"step {self.steps_run}: auditing what {n} optimizer steps consume")
            for ref in self.optimizers:
                if ref() is not None:
                    self.audit.watch(ref())
            self.audit.paused = False
        elif phase == "time":
            self.say(f"step {self.steps_run}: timing {n} steps")
            self.evals_in_step = []
            self.frames = compiled_frames()
            self._sample_host()
            self.load = LoadWatch().__enter__()  # what else ran meanwhile, read before and after
            self.start_mark = self.clock.now()
        elif phase == "memory":
            self.say(f"step {self.steps_run}: measuring memory over {n} steps")
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.allocated = [torch.cuda.memory_allocated()]
            else:
                with _unobserved():
                    self.ledger = AllocatorLedger(_live_tensors())
                self.stderr = _FilteredStderr(b"was allocated before the profiling started").__enter__()
                self.ledger.__enter__()
                self.ledger.mark()

    def _totals(self) -> tuple[int, int, int]:
        """Syncs, operators and debug-mode syncs so far, less evaluation's (and for operators the DataLoader's)."""
        c = self.counter
        debug = self.debug.count - self.eval.debug_syncs if self.debug else 0
        return c.syncs - self.eval.syncs, c.ops - self.eval.ops - self.data_ops, debug

    def _count_step(self) -> None:
        totals = self._totals()
        self.syncs_by_step.append(totals[0] - self._last[0])
        self.ops_by_step.append(totals[1] - self._last[1])
        self.debug_by_step.append(totals[2] - self._last[2])
        self._last = totals
        if self.collectives is not None:
            now = (sum(self.collectives.ops.values()), self.collectives.bytes)
            self.collectives_by_step.append(now[0] - self._last_collectives[0])
            self.comm_bytes_by_step.append(now[1] - self._last_collectives[1])
            self._last_collectives = now

    def _time_step(self, last: bool, end) -> None:
        self.step_marks.append((self.start_mark, end, self.evals_in_step))
        self.evals_in_step = []
        frames = compiled_frames()  # torch.compile compiled (or recompiled) in this step: its time is the compiler's
        if frames != self.frames:
            self.compiled_steps.append(len(self.step_marks) - 1)
            self.frames = frames
        self._sample_host()
        self.start_mark = None if last else self.clock.now()  # sampling the heap is not part of the next step

    def _sample_host(self) -> None:
        self.heap.append(heap_bytes())
        self.rss.append(rss_bytes())

    def _memory_step(self, last: bool) -> None:
        if self.cuda:
            self.allocated.append(torch.cuda.memory_allocated())
        elif not last:
            self.ledger.mark()

    def _end(self, phase: str) -> None:
        """Figures of a pass, from its complete steps (all of them, or as many as the script got through)."""
        n = self.done[phase]
        if phase == "count":
            self._collectives_off()
            self._end_count(n)
            self._counter_off()
        elif phase == "time":
            if self.load is not None:
                self.load.__exit__(None, None, None)
            times = []
            for start, end, evals in self.step_marks:
                if self.cuda:
                    end.synchronize()
                times.append(self.clock.seconds(start, end) - sum(self.clock.seconds(a, b) for a, b in evals))
                self.eval.time_s += sum(self.clock.seconds(a, b) for a, b in evals)
            kept = [t for i, t in enumerate(times) if i not in self.compiled_steps]
            if self.compiled_steps and kept:
                self.notes.append(f"{len(self.compiled_steps)} timed step(s) compiled (torch.compile: "
                                  f"{', '.join(f'{times[i]:.3g} s' for i in self.compiled_steps)}): left out of the "
                                  "step time, which is the compiled program's")
            self.step_times = kept if kept else times
        elif phase == "memory":
            self._end_memory(n)
        elif phase == "audit":
            self.audit.paused = True
            self.audit.unwatch()
            self._eval_unhook()
        self.phase = "ended"

    def _end_count(self, n: int) -> None:
        c, base = self.counter, self.base
        sites = _difference(_difference(c.sites, base["sites"]), self.eval.sites)
        site_kinds = _difference(_difference(c.site_kinds, base["site_kinds"]), self.eval.site_kinds)
        if self.collectives_by_step and n:
            ops = self.collectives_by_step[:n]
            self.collected = {"collectives_per_step": sum(ops) / n,
                              "comm_bytes_per_step": sum(self.comm_bytes_by_step[:n]) / n,
                              "collectives_by_step": ops}
            if self.collectives_seen is not None:
                self.collected["collective_ops"] = {op: c / n for op, c in sorted(self.collectives_seen.ops.items())}
                self.collected["collective_sites"] = {site: c / n
                                                      for site, c in self.collectives_seen.sites.most_common()}
        self.counted = {"steps": n, "sites": sites, "site_kinds": site_kinds,
                        "kinds": _kinds(site_kinds), "hazards": c.hazards - base["hazards"],
                        "hazard_sites": _difference(c.hazard_sites, base["hazard_sites"])}

    def _end_memory(self, n: int) -> None:
        if self.cuda:
            trace = self.allocated[:n + 1]
            self.memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
                           "allocator_counter_peak_bytes": torch.cuda.max_memory_allocated(),
                           "memory_growth_bytes_per_step": slope_per_step(trace),
                           "tensor_growth_bytes_per_step": slope_per_step(trace), "memory_trace_bytes": trace}
            return
        ledger, self.ledger = self.ledger, None
        try:
            ledger.__exit__(None, None, None)
        finally:
            self._stderr_back()
        steps = ledger.steps()[:n]
        if not steps:
            return
        peak, counter_peak = cpu_peaks(steps)
        live = [s["roots"] + s["start"] for s in steps]
        self.memory = {"peak_memory_bytes": peak, "allocator_counter_peak_bytes": counter_peak,
                       "tensor_growth_bytes_per_step": slope_per_step(live), "memory_trace_bytes": live}

    def _mark_device_tensors(self) -> None:
        """At the start of the count pass: what would be on the GPU by now. The counter tracked every tensor made
        on, moved to or computed from the stand-in; add the tensors sharing a tracked tensor's storage (a Parameter
        made of one, `param.data = ...` by `Module.to`) and then the optimizers' state of tracked parameters."""
        tracker = self.counter.tracker
        with _unobserved():
            storages = {storage_key(t) for t in list(tracker.tracked.keys())} - {None}
            for t in _live_tensors():
                if not tracker.on_device(t) and storage_key(t) in storages:
                    tracker.mark(t)
            for ref in self.optimizers:
                optimizer = ref()
                if optimizer is None:
                    continue
                grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                         if tracker.on_device(p) and p.grad is not None]
                self.counter.track(grads, optimizer_device_state(optimizer, keep=tracker.on_device))

    def _check_graphs(self) -> None:
        """Losses of steps that ended GRAPH_LAG or more boundaries ago whose autograd graph is still alive (and, from
        the audit pass, graphs evaluation built)."""
        for graphs, retained in ((self.graphs, self.retained_steps), (self.eval_graphs, self.eval_retained_steps)):
            keep = []
            for step, ref in graphs:
                if step > self.steps_run - GRAPH_LAG:
                    keep.append((step, ref))
                elif ref() is not None and step not in retained:
                    retained.append(step)
            graphs[:] = keep

    # -- results ---------------------------------------------------------------------------------------

    def measured(self, step: int) -> bool:
        return step > self.warmup and step <= self.warmup + sum(self.done.values())

    def figures(self) -> dict:
        """The record's measured fields (what `Measurement.figures` holds), from whatever passes ran."""
        for step, flag in self.finite_flags:
            if not bool(flag):
                self.nonfinite_steps.append(step)
        self.finite_flags = []
        f: dict = {"trace_steps_run": self.steps_run, "trace_passes": {p: self.done[p] for p in PHASES},
                   "trace_backward_passes": self.backward_passes,
                   "trace_optimizers": self.optimizer_names,
                   "skipped_steps": sum(self.skipped.values()),
                   "param_tensors": len({i for ids in self.param_ids for i in ids}) or None,
                   "reached_device": torch.cuda.max_memory_allocated() > 0 if self.cuda else self.reached,
                   "eval_passes_by_pass": {p: self.eval.passes[p] for p in PHASES if self.eval.passes[p]}}
        counted = self.counted
        n = counted.get("steps", 0)
        if n:
            f["syncs_per_step"] = sum(self.syncs_by_step) / n
            f["ops_per_step"] = sum(self.ops_by_step) / n
            f["syncs_by_step"] = self.syncs_by_step
            f["ops_by_step"] = self.ops_by_step
            f["data_ops_per_step"] = (self.data_ops - self.data_ops_counted) / n
            f["sync_sites"] = dict(counted["sites"])
            f["sync_kinds"] = dict(counted["kinds"])
            f["sync_site_details"] = site_details(counted["sites"], counted["site_kinds"], n, self.counter.site_code)
            f["unsynced_reads_per_step"] = counted["hazards"] / n
            f["unsynced_read_sites"] = dict(counted["hazard_sites"])
            if self.cuda:
                f["syncs_per_step_cuda_debug"] = sum(self.debug_by_step) / n
            f["eval_passes"] = self.eval.passes["count"]
            f["eval_syncs"] = self.eval.syncs
            f["eval_ops"] = self.eval.ops
            f["eval_sync_sites"] = dict(self.eval.sites)
        if self.done["time"]:
            f["eval_time_s"] = self.eval.time_s
            heap = self.heap[:self.done["time"] + 1]
            rss = self.rss[:self.done["time"] + 1]
            host = slope_per_step(heap) if heap and heap[0] is not None else float("nan")
            f["host_memory_growth_bytes_per_step"] = host
            f["rss_growth_bytes_per_step"] = slope_per_step(rss) if rss and rss[0] is not None else None
            if not self.cuda:
                f["memory_growth_bytes_per_step"] = host  # CPU: the C heap, as `loopmark run` on CPU
        f.update(self.memory)
        f.update(self.collected)
        if self.ranks_differ is not None:
            f["ranks_differ_after_step"] = self.ranks_differ[0]
        if not self.cuda and "memory_growth_bytes_per_step" not in f and "tensor_growth_bytes_per_step" in f:
            f["memory_growth_bytes_per_step"] = f["tensor_growth_bytes_per_step"]
        measured_retained = [s for s in self.retained_steps if self.measured(s)]
        if sum(self.done.values()):
            f["retains_graph"] = bool(measured_retained)
            f["graph_retained_steps"] = len(measured_retained)
        f["nonfinite_loss_steps"] = sorted(s for s in self.nonfinite_steps if self.measured(s))
        f["trace_notes"] = list(self.notes)
        f.update(self._verdict(f, measured_retained))
        return f

    def _verdict(self, f: dict, retained: list[int]) -> dict:
        """The script's verdict from the audit pass's findings (bench.audit) and what every pass saw: a loss graph
        kept across steps, one evaluation kept, a non-finite loss."""
        findings = self.audit.findings
        broken = []
        if f["nonfinite_loss_steps"]:
            broken.append(f"the loss of step {f['nonfinite_loss_steps'][0]} is not finite (inf or NaN)")
        if retained:
            broken.append(f"the loss of step {retained[0]} still holds its autograd graph {GRAPH_LAG} steps later: "
                          "the script keeps its losses' graphs (`running += loss` without .detach() or .item()?)")
        if self.eval_retained_steps:
            broken.append(f"evaluation at step {self.eval_retained_steps[0]} built autograd graphs that were still "
                          f"alive {GRAPH_LAG} steps later (evaluation without torch.no_grad(), and a loss kept?)")
        if self.ranks_differ is not None:
            step, rank = self.ranks_differ
            broken.append(f"after step {step} this rank's parameters differ from rank {rank}'s: a gradient the ranks "
                          "did not share (no_sync on the wrong micro-batch?)")
        different = [self.same_order] if self.same_order else []
        if not self.done["audit"] and not broken and not different:
            return {"verdict": "unverified", "verdict_reason": "the script ended before the audit pass",
                    "audit_steps": 0}
        verdict, reason = audit_verdict(findings, broken, extra_different=different)
        return {"verdict": verdict, "verdict_reason": reason,
                "audit_steps": sum(1 for x in findings if x.kind != "skipped"),
                "audit_findings": dict(Counter(x.kind for x in findings))}


def _difference(a: Counter, b: Counter) -> Counter:
    out = Counter(a)
    out.subtract(b)
    return Counter({k: v for k, v in out.items() if v > 0})


def _kinds(site_kinds: Counter) -> Counter:
    kinds: Counter = Counter()
    for (_, kind), n in site_kinds.items():
        kinds[kind] += n
    return kinds


# -- running a script -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """How the script ended: `stopped` (the passes were done), `ended` (by itself: returned or sys.exit(0)),
    `exited` (sys.exit with another status), `raised`."""

    how: str
    detail: str = ""
    exit_status: object = None
    exception: BaseException | None = None  # what the script raised (`raised`), its traceback kept

    def traceback_text(self) -> str:
        """The script's traceback, from its own frames on (the frames of runpy and loopmark left out)."""
        if self.exception is None:
            return ""
        tb = self.exception.__traceback__
        while tb is not None and _is_ours(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        return "".join(traceback.format_exception(type(self.exception), self.exception, tb))


def _is_ours(filename: str) -> bool:
    return filename == __file__ or os.path.basename(filename) == "runpy.py" or filename.startswith("<frozen runpy")


def run_target(target: Target) -> Outcome:
    """Run the script as `python` would (argv, `__main__`, its directory first on sys.path); how it ended. The
    working directory, sys.argv and sys.path are loopmark's again afterwards."""
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    sys.argv = list(target.argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator")
            if target.module:
                runpy.run_module(target.module, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(target.path))
                runpy.run_path(target.path, run_name="__main__")
        return Outcome("ended")
    except _Stop:
        return Outcome("stopped")
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0:
            return Outcome("ended", "sys.exit(0)")
        return Outcome("exited", f"the script exited with status {code!r}", code)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return Outcome("raised", f"the script raised {type(exc).__name__}: {exc}".split("\n")[0][:300], exception=exc)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        os.chdir(saved_cwd)
        if multiprocessing.active_children():
            gc.collect()  # DataLoader workers whose iterator is in a cycle with the script's globals end here


# -- where the trace is, for a launcher's heartbeat -----------------------------------------------

_STEPS_SEEN = [0]  # the step count of this process's trace, when progress() last saw it


def progress(idle: str = "before the script's first step") -> tuple[tuple, str]:
    """Where this process's trace is, for a launcher's heartbeat: (its step count, which pass and step in words). It
    changes at step boundaries only, so a rank that no longer steps is seen so; `idle` once no trace runs."""
    if _ACTIVE:
        tracer = _ACTIVE[0]
        _STEPS_SEEN[0] = step = tracer.steps_run
        where = f"{tracer.phase} pass" if tracer.phase in PHASES else tracer.phase
        return ("step", step), f"{where}, step {step + 1}"
    return ("step", _STEPS_SEEN[0]), idle


@dataclass
class Trace:
    record: dict  # the cell record, as `loopmark run` writes it
    outcome: Outcome
    exit_code: int  # 0 measured (maybe fewer steps than asked: a note says so), 1 the script failed or never stepped


def trace(target: Target, steps: int = DEFAULT_STEPS, warmup: int = DEFAULT_WARMUP, device_name: str | None = None,
          say=None, on_exit=None) -> Trace:
    """Run `target` under a Tracer and make its cell record (workload = the script's name, variant = "trace").
    `on_exit(result) -> int`: what to do with the result if the script calls `os._exit` (write it); what it returns
    is the process's exit status (by default the trace's `exit_code`)."""
    tracer = Tracer(steps, warmup, say=say)
    tracer.counter.root = os.path.dirname(target.path) if target.path else None  # its sites: from its directory

    def conclude(outcome: Outcome) -> Trace:
        return _result(tracer, target, outcome, steps, warmup, device_name)

    with tracer, _os_exit_kept(tracer, conclude, on_exit):
        outcome = run_target(target)
    return conclude(outcome)


@contextlib.contextmanager
def _os_exit_kept(tracer: Tracer, conclude, on_exit):
    """`os._exit(n)` ends the process at once, with no exception to unwind the script and nothing of the trace
    written. While the script runs, `os._exit` in this process first finishes the trace and hands its result
    (`conclude`, an outcome `exited`, or `ended` for 0) to `on_exit`, then ends the process with the status that
    returns. In a forked child (a DataLoader worker ending) it is `os._exit` as it was."""
    real, pid = os._exit, os.getpid()

    def _exit(status):
        if os.getpid() != pid:
            real(status)
        code = 1
        try:
            tracer.finish()
            outcome = Outcome("ended" if status == 0 else "exited", f"the script called os._exit({status})", status)
            result = conclude(outcome)
            code = on_exit(result) if on_exit is not None else result.exit_code
        except BaseException as exc:  # the process ends here whatever happened: say it, exit 1
            print(f"loopmark trace: the script called os._exit({status}); the trace could not be finished: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            real(code)

    os._exit = _exit
    try:
        yield
    finally:
        os._exit = real


def _result(tracer: Tracer, target: Target, outcome: Outcome, steps: int, warmup: int, device_name) -> Trace:
    """The cell record of a finished tracer, and the trace's exit code."""
    figures = tracer.figures()
    planned = warmup + len(PHASES) * steps
    status, error, exit_code = "ok", None, 0
    if tracer.steps_run == 0:
        status, exit_code = "error", 1
        error = "the script never called optimizer.step()" + (
            f": {outcome.detail}" if outcome.how in ("exited", "raised") else " (it ended without one)")
    elif outcome.how in ("exited", "raised"):
        status, error, exit_code = "error", f"{outcome.detail} at step {tracer.steps_run + 1}", 1
    elif figures["nonfinite_loss_steps"]:
        status = "diverged"
        error = f"non-finite loss at step(s) {_steps_text(figures['nonfinite_loss_steps'])}"
    if not tracer.stopped and tracer.steps_run:
        figures["trace_notes"].append(
            f"the script {'ended' if outcome.how == 'ended' else 'stopped'} after {tracer.steps_run} of the "
            f"{planned} steps planned ({warmup} warm-up + {len(PHASES)} passes of {steps}): passes "
            + ", ".join(f"{p} {tracer.done[p]}/{steps}" for p in PHASES))
    if outcome.exception is not None:
        frames = traceback.extract_tb(outcome.exception.__traceback__)[::-1]
        figures["error_site"] = launcher.own_location([(f.filename, f.lineno, f.name) for f in frames])
    rank, ranks = launcher.torchrun_rank()
    if ranks > 1:  # a cell per rank
        figures["rank"] = rank
    spec = CellSpec(workload=target.name if ranks == 1 else f"{target.name} rank {rank}", variant=TRACE_VARIANT,
                    kind="train", device=tracer.device.type, idiom="trace", description=target.command,
                    ranks=ranks if ranks > 1 else None,
                    device_name=torch.cuda.get_device_name() if tracer.cuda else device_name,
                    torch_version=torch.__version__, steps=tracer.done["count"] or None,
                    repeats=1 if tracer.done["time"] else None, warmup_steps=warmup)
    blocks = [tracer.step_times] if tracer.done["time"] else []
    load = [tracer.load.figures] if blocks and tracer.load is not None and tracer.load.figures else []
    r = record(spec, Measurement(status=status, error=error, figures=figures, blocks=blocks, block_load=load))
    r["reliability"] = stats.reliability(r.get("block_load"), r["device"])  # as `derive` has it for a run's cells
    return Trace(r, outcome, exit_code)


def strict_failures(r: dict) -> list[str]:
    """What makes `trace --strict` fail: a broken verdict, a pass that measured no step."""
    failed = [f"verdict broken: {r.get('verdict_reason')}"] if r.get("verdict") == "broken" else []
    empty = [p for p, n in (r.get("trace_passes") or {}).items() if not n]
    if empty:
        failed.append(f"no step measured in the {', '.join(empty)} pass(es)")
    return failed


def _busy(reliability) -> str:
    """What the summary says of step times measured on a busy machine (`reports.stats.reliability`)."""
    if not (isinstance(reliability, str) and reliability.startswith("unreliable")):
        return ""
    why = reliability.split(": ", 2)[-1]  # "unreliable: interference in 1 of 1 of its timed blocks: WHY"
    return f"? a busy machine: {why}; trace again on a quiet one to trust the step time"


def _steps_text(steps: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


# -- what `loopmark trace` prints ----------------------------------------------------------------------------

def summary(r: dict, sites: list[dict] | None = None) -> str:
    """The per-step table and the costliest sync sites of a trace record. `sites`: the sites as a report renders them
    (`site`, `per_step`, `operation`, `code`, maybe `setting`: a framework's setting behind the site, said under the
    table), by default the record's with the counter's names of the operations."""
    def number(key, spec=".3g"):
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"

    def size(key, per_step=""):
        v = r.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "-"
        return ("+" if v > 0 and per_step else "") + human_bytes(v) + per_step

    passes = r.get("trace_passes") or {}
    lines = [f"trace of {r['workload']} on {trace_device(r)}: {r.get('warmup_steps')} warm-up steps, then "
             + ", ".join(f"{passes.get(p, 0)} {p}" for p in PHASES) + " steps"]
    if r.get("verdict"):
        lines.append(f"verdict: {r['verdict']}: {r.get('verdict_reason')}")
    median = r.get("step_time_median_s")
    rows = [["host-device syncs", number("syncs_per_step"), ", ".join(str(int(s)) if float(s).is_integer() else
                                                                     f"{s:g}" for s in r.get("syncs_by_step") or [])],
            ["operators", number("ops_per_step", ".1f"), "dispatched aten operators, DataLoader iteration apart"],
            ["step time (median)", f"{median * 1e3:.3g} ms" if isinstance(median, float) else "-",
             "; ".join(x for x in (f"IQR {r['step_time_iqr_s'] * 1e3:.2g} ms"
                                   if isinstance(r.get("step_time_iqr_s"), float) else "",
                                   _busy(r.get("reliability"))) if x)],
            ["peak memory", size("peak_memory_bytes"), "CUDA allocator" if r["device"] == "cuda"
             else "CPU tensors (host and stand-in device)"],
            ["memory growth", size("memory_growth_bytes_per_step", "/step"),
             "device allocator" if r["device"] == "cuda" else "C heap"],
            ["graph kept across steps", {True: "YES", False: "no"}.get(r.get("retains_graph"), "-"),
             f"{r.get('graph_retained_steps')} step(s) whose loss's graph outlived them by {GRAPH_LAG} steps"
             if r.get("retains_graph") else ""],
            ["non-finite loss", str(len(r.get("nonfinite_loss_steps") or [])) + " step(s)",
             _steps_text(r.get("nonfinite_loss_steps") or [])],
            ["optimizer steps skipped", str(r.get("skipped_steps") or 0), "by a GradScaler (inf/NaN gradients)"]]
    if r["device"] == "cuda":
        rows.insert(5, ["host memory growth", size("host_memory_growth_bytes_per_step", "/step"), "C heap"])
    if r.get("collectives_per_step") is not None:  # a rank of a process group
        by_step = ", ".join(str(n) for n in r.get("collectives_by_step") or [])
        origins = ", ".join(f"{site} {n:g}/step" for site, n in (r.get("collective_sites") or {}).items())
        rows.insert(1, ["collectives", number("collectives_per_step"),
                        f"{by_step}; {size('comm_bytes_per_step')} sent/step; {origins}"])
    if r.get("syncs_per_step_cuda_debug") is not None:
        rows.insert(1, ["syncs (CUDA debug mode)", number("syncs_per_step_cuda_debug"),
                        "torch.cuda.set_sync_debug_mode: misses torch.cuda.synchronize()"])
    seen = r.get("eval_passes_by_pass") or ({"count": r["eval_passes"]} if r.get("eval_passes") else {})
    if seen:  # wherever it fell: its syncs are counted only when it fell in the count pass
        where = ", ".join(f"{n} in the {p} pass" for p, n in seen.items())
        counted = (f"{r.get('eval_syncs', 0)} syncs, {r.get('eval_ops', 0)} operators in the count pass"
                   if seen.get("count") else "its syncs not counted (it fell outside the count pass)")
        rows.append(["evaluation (left out)", f"{sum(seen.values())} pass(es)",
                     f"{where}: {counted}" + (f"; {r['eval_time_s']:.3g} s in the time pass"
                                              if r.get("eval_time_s") else "")])
    lines += ["", format_table(["per step", "value", ""], rows, right=[1])]
    if sites is None:
        sites = [{**d, "operation": ", ".join(d["operations"]), "code": site_code(d)}
                 for d in r.get("sync_site_details") or []]
    if sites:
        lines += ["", f"sync sites, most syncs first ({min(len(sites), TOP_SITES)} of {len(sites)}):",
                  format_table(["site", "operation", "per step", "code"],
                               [[d["site"], d["operation"], f"{d['per_step']:g}", d["code"]]
                                for d in sites[:TOP_SITES]], right=[2])]
        settings: dict[str, list[str]] = {}
        for d in sites[:TOP_SITES]:
            if d.get("setting"):
                settings.setdefault(d["setting"], []).append(d["site"])
        lines += [f"setting behind {', '.join(where)}: {setting}" for setting, where in settings.items()]
    for note in r.get("trace_notes") or []:
        lines.append(f"note: {note}")
    if r.get("status") != "ok":
        lines.append(f"{r['status']}: {r.get('error')}")
    return "\n".join(lines)
