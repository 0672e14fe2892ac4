"""Distributed cells: the `ddp` variants, one process per rank under torchrun, the gloo backend on CPU and nccl on
CUDA. `loopmark run --nproc-per-node N` runs itself as the N ranks of a one-node torchrun job (`bench.launcher`
starts them as `torchrun --standalone` would, forked from one process that imported torch once), and a user's own
torchrun command (several nodes: `--nnodes`, `--rdzv-endpoint`) runs it the same way.

Every rank runs every pass of every cell, in the same order (`DistributedRunner`); rank 0 writes the results. Per
cell, beside what a one-process cell has:

* collectives per optimizer step and the bytes they carry, counted where torch dispatches them (`CollectiveCounter`:
  every `c10d::` operator, so DDP's bucket all-reduces, its used-parameter all-reduce and buffer broadcasts, and the
  loop's own `dist.all_reduce` alike), in a pass of its own: never in a timed block;
* syncs per step and peak memory of every rank, and step time as the slowest rank's: each block starts on a barrier
  (outside the timed region) and each step's time is the longest any rank took;
* the ranks' parameters compared after every optimizer step of the correctness pass (`bench.correctness`).
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.launcher import FLIGHT_RECORDER_ENV, HEARTBEAT_ENV
from bench.syncs import locate


def active() -> bool:
    """Whether this process is a rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, ranks); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def shard() -> tuple[int, int] | None:
    """This rank's (rank, ranks) for a DistributedSampler; None outside a process group."""
    return world() if active() else None


def rank_device(device_type: str) -> torch.device:
    """The device this rank trains on: its own GPU (LOCAL_RANK), or the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local % max(torch.cuda.device_count(), 1))


def init(device_type: str, timeout_s: float | None = None) -> None:
    """Join the process group torchrun describes: nccl for CUDA, gloo for the CPU."""
    import datetime

    # nccl needs a GPU per rank: ranks sharing a GPU go through gloo, which handles CUDA tensors too
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    backend = "nccl" if device_type == "cuda" and ranks <= torch.cuda.device_count() else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank_device("cuda"))
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, **kwargs)
    _dump_stack_on_request()


_STACK_FILE = None  # kept open: faulthandler writes into it from its signal handler


def _dump_stack_on_request(rank: int | None = None) -> None:
    """On SIGUSR1, write every thread's Python stack where the launcher reads it: what a hung rank is stuck in. It
    works while the rank is blocked inside torch's C++ (faulthandler needs no Python code to run)."""
    global _STACK_FILE
    import faulthandler
    import signal

    where = _heartbeat_dir()
    if where is None or not hasattr(signal, "SIGUSR1"):
        return
    rank = world()[0] if rank is None else rank
    _STACK_FILE = open(where / f"stack{rank}.txt", "w")  # noqa: SIM115 (open for the process's life)
    faulthandler.register(signal.SIGUSR1, file=_STACK_FILE, all_threads=True)


def wrap(model: torch.nn.Module, device: torch.device, options: dict) -> torch.nn.Module:
    """`model` in DistributedDataParallel with a variant's options."""
    if not active():
        raise ValueError("a distributed (ddp_*) variant runs one process per rank: loopmark run --nproc-per-node N")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **options)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module DDP trains (the model itself when it is not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gather(obj) -> list:
    """`obj` from every rank, in rank order (the object itself alone outside a process group)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def finish() -> None:
    """Leave the process group once every rank is done (a rank that exits with it open may abort)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def backend() -> str | None:
    return str(dist.get_backend()) if active() else None


# ---------------------------------------------------------------- what a rank tells its launcher
def _heartbeat_dir():
    from pathlib import Path

    where = os.environ.get(HEARTBEAT_ENV)
    return Path(where) if where else None


def _write_json(name: str, doc: dict) -> None:
    import json

    where = _heartbeat_dir()
    if where is None:
        return
    tmp = where / f".{name}.tmp"
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, where / name)
    except OSError:  # the launcher's directory is gone: it is ending this run
        pass


def heartbeat(cell, text: str, rank: int | None = None) -> None:
    """This rank works on `cell` (workload, variant, device): `text` says which pass or block. `rank`: this process's
    rank where it is not yet (or no longer) in a process group."""
    import time

    rank = world()[0] if rank is None else rank
    _write_json(f"rank{rank}.json", {"rank": rank, "cell": list(cell) if cell else None, "text": text,
                                      "time": time.time(), "pid": os.getpid()})


def beat_in_background(rank: int, progress, every_s: float = 0.5) -> None:
    """Under a launcher that watches its ranks (HEARTBEAT_ENV): this rank's stack on SIGUSR1, and a daemon thread
    writing `progress()`, a (cell, text) pair, as this rank's heartbeat each time it changes. For `loopmark trace`,
    whose heartbeats cannot be written by the script's steps (they are timed): the thread reads what the tracer has
    already counted, never touches a tensor, and blocks SIGUSR1, so that the stack dumped is the main thread's."""
    import signal
    import threading
    import time

    if _heartbeat_dir() is None:
        return
    _dump_stack_on_request(rank)

    def beat():
        if hasattr(signal, "pthread_sigmask") and hasattr(signal, "SIGUSR1"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        last = None
        while True:
            now = progress()
            if now != last:
                heartbeat(now[0], now[1], rank)
                last = now
            time.sleep(every_s)

    threading.Thread(target=beat, name="loopmark-heartbeat", daemon=True).start()


def report_fault(cell, status: str, error: str | None) -> None:
    """This rank's cell ended in a fault (`status`, `error`); the process is about to end."""
    _write_json(f"fault{world()[0]}.json", {"rank": world()[0], "cell": list(cell), "status": status,
                                             "error": error})


# ---------------------------------------------------------------- collectives
# what each c10d operator sends from this rank: the tensors of its first argument, or of the second where the first
# holds the outputs (allgather, reduce_scatter, gather, alltoall)
_INPUT_SECOND = ("allgather", "reduce_scatter", "_reduce_scatter_base", "gather_", "alltoall")


class CollectiveCounter(TorchDispatchMode):
    """Counts every c10d collective dispatched while entered (from the loop, from DDP's reducer, from its buffer
    broadcast), with the bytes of the tensors this rank sends and the loop line it came from (`file:line`)."""

    def __init__(self, keep: list | None = None):
        super().__init__()
        self.ops: Counter = Counter()
        self.sites: Counter = Counter()
        self.bytes = 0
        self.keep = keep  # a list: every tensor a collective sends is added to it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("c10d::"):
            op = name[len("c10d::"):]
            sent = args[1] if len(args) > 1 and any(op.startswith(p) for p in _INPUT_SECOND) else args[0] if args \
                else ()
            tensors = [t for t in tree_flatten(sent)[0] if isinstance(t, torch.Tensor)]
            self.ops[op] += 1
            self.sites[locate().text] += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            if self.keep is not None:
                self.keep.extend(tensors)
        return func(*args, **(kwargs or {}))


def measure_collectives(cell, batches: list) -> dict:
    """Collectives and bytes sent per optimizer step over one epoch of `batches` (the cell is warmed up)."""
    steps = [0]
    hook = cell.optimizer.register_step_post_hook(lambda *a: steps.__setitem__(0, steps[0] + 1))
    counter = CollectiveCounter()
    try:
        with counter:
            cell.epoch(cell.batches(batches))
    finally:
        hook.remove()
    n = max(steps[0], 1)
    return {"collectives_per_step": sum(counter.ops.values()) / n, "comm_bytes_per_step": counter.bytes / n,
            "collective_ops": {op: c / n for op, c in sorted(counter.ops.items())},
            "collective_sites": {site: c / n for site, c in counter.sites.most_common()}}


def collective_buffers(cell, batches: list) -> list:
    """The tensors a DDP cell's collectives send (its gradient buckets, whose views DDP copies gradients into), seen
    over two steps of `batches`: on CUDA they live on the GPU, so the sync pass counts copies into them as the device
    copies they are there. None for a cell that is not distributed."""
    if not active() or unwrap(cell.model) is cell.model or not batches:
        return []
    kept: list = []
    with CollectiveCounter(keep=kept):  # two steps: DDP rebuilds its buckets, and sets up a static graph, in them
        cell.epoch(cell.batches([batches[i % len(batches)] for i in range(2)]))
    return kept


# ---------------------------------------------------------------- correctness across ranks
def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the ranks (the harness's own collective, never counted: no pass counts while it runs)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def rank_difference(params: list) -> float:
    """The largest difference between this rank's parameters and any other rank's (0.0: all bitwise the same)."""
    if not active():
        return 0.0
    flat = torch.cat([p.detach().flatten().float() for p in params])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return max(float((other - flat).abs().max()) for other in everyone)


class EpochBatches:
    """What a distributed cell's loop reads in the correctness pass, epoch after epoch: this rank's part through a
    DistributedSampler (`Workload.loader(shard=...)`), the first `steps` batches of each epoch, on the device. The
    loader outlives the epochs, so an epoch's order is whatever the loop's `sampler.set_epoch` made it."""

    def __init__(self, workload, steps: int, device: torch.device):
        self.loader = workload.loader("train", shard=world())
        self.steps, self.device = steps, device
        self.orders: list[list[int]] = []  # per epoch read, the sample order its sampler gave

    def repeated(self) -> int | None:
        """The first epoch (1-based) that drew the same samples in the same order as the one before it, if any."""
        return next((e + 1 for e in range(1, len(self.orders)) if self.orders[e] == self.orders[e - 1]), None)

    def __call__(self, cell, epoch: int) -> _Epoch:
        return _Epoch(self)


class _Epoch:
    def __init__(self, source: EpochBatches):
        self.source = source
        self.sampler = source.loader.sampler  # what `sampler.set_epoch(epoch)` reaches through `run.batches`

    def __len__(self) -> int:
        return self.source.steps

    def __iter__(self):
        import itertools

        self.source.orders.append(list(self.sampler))  # the order this epoch's loader reads, as set_epoch made it
        for batch in itertools.islice(self.source.loader, self.source.steps):
            yield tuple(t.to(self.source.device) for t in batch)


class StagedShard(list):
    """This rank's staged batches as the sync, collective, memory and timing passes hand them to a distributed loop:
    with a `sampler`, as the loop's DataLoader has, whose `set_epoch` keeps the staged order (a script's unguarded
    `train_data.sampler.set_epoch(epoch)` runs as it does on its loader; the correctness pass reads a live one)."""

    def __init__(self, batches):
        super().__init__(batches)
        self.sampler = _StagedOrder()


class _StagedOrder:
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def global_batches(workload, epochs: int, steps: int, device: torch.device, ranks: int) -> list:
    """The batches one process training on the global batch sees: per step, every rank's part (epoch `e` ordered by
    `set_epoch(e)`, as the seed's loop does) joined in rank order; `epochs * steps` of them, on the device."""
    import itertools

    merged = []
    for e in range(epochs):
        parts = []
        for r in range(ranks):
            loader = workload.loader("train", shard=(r, ranks))
            loader.sampler.set_epoch(e)
            parts.append(list(itertools.islice(loader, steps)))
        for n, step in enumerate(zip(*parts), 1):
            shapes = {tuple(t.shape[1:]) for t in step[0] if isinstance(t, torch.Tensor)} if step else set()
            if any({tuple(t.shape[1:]) for t in batch if isinstance(t, torch.Tensor)} != shapes for batch in step):
                raise ValueError(f"the ranks' batches of step {n} have different shapes, so no single process can "
                                 f"train on their union: {workload.name!r} has no global-batch reference for "
                                 "ddp_baseline")
            merged.append(tuple(torch.cat(ts).to(device) for ts in zip(*step)))
    return merged


def flight_recorder() -> str:
    """What this rank's flight recorder keeps, as its environment sets it (`bench.launcher` turns it off)."""
    size = os.environ.get(FLIGHT_RECORDER_ENV, os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"))
    return "off" if size == "0" else f"{size} entries" if size else "torch's default"
