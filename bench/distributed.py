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

import contextlib
import os
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.syncs import locate

# set by the launching `loopmark run` in its torchrun's environment: where the ranks report which cell and pass they
# are in (`heartbeat`), so that it can name the cell and the rank of a crash or a hang
HEARTBEAT_ENV = "LOOPMARK_HEARTBEAT_DIR"
# set by the launching `loopmark trace`: its --cell-timeout, the longest a traced script's collective may wait
TIMEOUT_ENV = "LOOPMARK_CELL_TIMEOUT"


def active() -> bool:
    """Whether this process is a rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Whether torchrun started this process (its environment names the rank and the rendezvous)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_rank() -> tuple[int, int]:
    """(rank, ranks) of this process as torchrun started it; (0, 1) outside torchrun."""
    if not launched():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


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


# ---------------------------------------------------------------- the launching `loopmark run --nproc-per-node N`
# c10d's flight recorder keeps its last 2000 collectives in a ring buffer: about 1.5 MiB of C heap that grows a few
# hundred bytes a step until it is full, which the memory pass would report as the loop's growth. The launcher turns
# it off unless the environment sets it; results.json's environment says which (`flight_recorder`).
FLIGHT_RECORDER_ENV = "TORCH_FR_BUFFER_SIZE"


def quiet_ranks_env(nproc: int, threads: int | None = None) -> dict:
    """The ranks' environment: the cores shared out among them (OMP_NUM_THREADS), the flight recorder off unless set,
    and the command the user typed (what results.json records as the run's command)."""
    import sys

    from bench.env import COMMAND_ENV

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault(FLIGHT_RECORDER_ENV, "0")
    env.setdefault(COMMAND_ENV, " ".join(["loopmark", *sys.argv[1:]]))  # what the user typed, for the results
    return env


def flight_recorder() -> str:
    """What this rank's flight recorder keeps, as its environment sets it."""
    size = os.environ.get(FLIGHT_RECORDER_ENV, os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"))
    return "off" if size == "0" else f"{size} entries" if size else "torch's default"
def _signal_name(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _root_cause(log: str) -> tuple[int, str] | None:
    """(rank, how it ended) of the first failure torchrun's summary names."""
    import re

    found = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log, re.S)
    return (int(found.group(1)), _signal_name(int(found.group(2)))) if found else None


def _read_json(path) -> dict | None:
    import json

    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


class _Ranks:
    """What the ranks of one torchrun reported in its heartbeat directory."""

    def __init__(self, where):
        self.where = where

    def clear(self) -> None:
        for path in self.where.glob("*.json"):
            path.unlink(missing_ok=True)

    def beats(self) -> list[dict]:
        return [d for d in map(_read_json, sorted(self.where.glob("rank*.json"))) if d]

    def faults(self) -> list[dict]:
        return sorted((d for d in map(_read_json, self.where.glob("fault*.json")) if d), key=lambda d: d["rank"])


def _forward(stream, log: list, echo) -> None:
    """Copy the ranks' output to `echo`, line by line, and keep all of it in `log`. torchrun's own log lines and its
    failure report are kept, not shown: the launcher says in one line what failed."""
    import re

    from bench.launcher import PREFIX

    launcher_line = re.compile(rf"^([WEI]\d{{4}} \d\d:\d\d:\d\d|{re.escape(PREFIX)})")
    torch_rank = re.compile(r"^\[rank\d+\]:")  # torch's prefix on a rank's own warnings and tracebacks
    report = False
    for line in stream:
        log.append(line)
        report = report or line.startswith("Traceback (most recent call last)")
        if not (report or launcher_line.match(line) or torch_rank.match(line)):
            echo(line.rstrip("\n"))


def ranks_command(nproc: int, args: list[str], rendezvous: list[str] | None = None) -> list[str]:
    """The command that runs `python -m bench ARGS` as `nproc` ranks: on this machine alone, `bench.launcher` (the
    ranks of `torchrun --standalone`, forked from one process that imported torch once); with torchrun's rendezvous
    options (several nodes), torchrun itself."""
    import sys

    if rendezvous:
        return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}", "-m", "bench",
                *args]
    return [sys.executable, "-m", "bench.launcher", str(nproc), *args]


def launcher_limit(cell_timeout: float | None) -> float | None:
    """How long a launcher lets its ranks go without progress: a rank stops its own cell at `cell_timeout` (an alarm,
    or for `loopmark trace` its collectives' timeout); past that by as much again (a minute at most), it is blocked
    where nothing reaches it. None: no limit."""
    return cell_timeout + min(cell_timeout, 60) if cell_timeout else None


def launch(child_args: list[str], out, nproc: int, device: str, cell_timeout: float, record_fault, say) -> None:
    """Run `loopmark run CHILD_ARGS` under torchrun, `nproc` ranks on this machine, until every planned cell is
    finished. A crash, a hang (no progress within the cell's time limit and as much again) or a fault of a cell ends
    the ranks, all of them and everything they started; `record_fault(cell, status, message)` records that cell, and
    the ranks start again (`--resume`) on the cells after it. `say(line)` shows the ranks' output. Returns when a
    torchrun ends well, or when its ranks reached no cell (then every cell still planned is recorded by
    `record_fault(None, ...)`). SIGTERM ends the ranks as Ctrl-C does (KeyboardInterrupt)."""
    import tempfile
    from pathlib import Path

    env = quiet_ranks_env(nproc)
    limit = launcher_limit(cell_timeout)
    faulted: set = set()
    with tempfile.TemporaryDirectory(prefix="loopmark-ranks-") as where, _terminate_as_interrupt():
        ranks, env[HEARTBEAT_ENV] = _Ranks(Path(where)), where
        cmd = ranks_command(nproc, ["run", *child_args, "--device", device, "--out", str(out), "--resume"])
        while True:
            code, hung, current, log = _one_torchrun(cmd, env, ranks, limit, nproc, say)
            if code == 0 and hung is None:
                return
            cell, status, message = _what_failed(ranks, log, code, hung, current, nproc, limit)
            if cell is None or cell in faulted:  # no cell reached, or the same one again: nothing left to go on with
                record_fault(None, status, message)
                return
            faulted.add(cell)
            record_fault(cell, status, message)


def _one_torchrun(cmd: list[str], env: dict, ranks: _Ranks, limit: float | None, nproc: int, say,
                  stalled: str = "no progress in {limit:g} s (the cell's time limit and as much again, a minute at "
                                 "most)"):
    """Run one torchrun, watching its ranks' heartbeats; (exit status, what hung or None, the cell it was in, its
    output). Every process it started is ended when it returns. `stalled` begins what hung says."""
    import subprocess
    import threading
    import time

    ranks.clear()
    log: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    reader = threading.Thread(target=_forward, args=(proc.stdout, log, say), daemon=True)
    reader.start()
    hung, since, current = None, time.monotonic(), None
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            beats = ranks.beats()
            cells = [tuple(b["cell"]) for b in beats if b.get("cell")]
            now = max(cells, key=cells.count) if cells else None
            if now != current:
                current, since = now, time.monotonic()
            if limit and current and time.monotonic() - since > limit:
                hung = f"{stalled.format(limit=limit)}: {_stuck(ranks, beats, nproc)}"
                break
            late = next((f for f in ranks.faults() if f["status"] == "timeout"), None)
            if late:  # a rank ran out of time, maybe waiting for another: where is each?
                current = tuple(late["cell"])
                hung = (f"{late['error']} on rank {late['rank']}, which waited: "
                        f"{_stuck(ranks, beats, nproc, late['rank'])}")
                break
    finally:
        _end(proc)
        reader.join(timeout=5)
    return proc.returncode, hung, current, "".join(log)


def _stuck(ranks: _Ranks, beats: list[dict], nproc: int, timed_out: int | None = None) -> str:
    """Where each rank of a hung cell is, from the stacks the ranks dump on SIGUSR1: a rank stopped in code of its own
    is named as the one the others wait for (they wait inside torch, in a collective)."""
    import signal
    import time

    heard = {b["rank"]: b for b in beats}
    silent = [r for r in range(nproc) if r not in heard]
    if silent:
        return f"rank {', '.join(map(str, silent))} never reported"
    for b in heard.values():
        with contextlib.suppress(KeyError, ValueError, ProcessLookupError, PermissionError):
            os.kill(int(b["pid"]), signal.SIGUSR1)
    time.sleep(1.0)
    where = {r: _innermost(ranks.where / f"stack{r}.txt") for r in sorted(heard) if r != timed_out}
    stopped = [r for r, (at, in_torch) in where.items() if in_torch is False and at]
    parts = [f"rank {r} stopped at {where[r][0]}" for r in stopped]
    parts += [f"rank {r} waiting in torch at {where[r][0]}" if where[r][0] else f"rank {r} at '{heard[r]['text']}'"
              for r in where if r not in stopped]
    return "; ".join(parts)


def _innermost(path) -> tuple[str | None, bool | None]:
    """From a faulthandler dump: (the innermost frame of the main thread outside torch and loopmark's harness, whether
    the innermost frame of all is in torch); (None, None) without a dump."""
    import re

    try:
        dump = path.read_text(errors="replace")
    except OSError:
        return None, None
    blocks = re.split(r"\n\s*\n", dump.strip())
    main = next((b for b in blocks if b.startswith("Current thread")), blocks[-1] if blocks else "")
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', main)
    if not frames:
        return None, None
    return own_location(frames), frames[0][0].startswith(os.path.dirname(torch.__file__))


def own_location(frames) -> str | None:
    """`file:line in function` of the innermost of `frames` (innermost first: (file, line, function)) outside torch,
    loopmark's harness and runpy: where the user's own code is; relative to the working directory below it."""
    import runpy

    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)), runpy.__file__, "<")
    own = next(((f, n, fn) for f, n, fn in frames if not f.startswith(skip)), None)
    if own is None:
        return None
    rel = os.path.relpath(own[0])
    return f"{own[0] if rel.startswith('..') else rel}:{own[1]} in {own[2]}"


def _what_failed(ranks: _Ranks, log: str, code: int, hung: str | None, current, nproc: int, limit):
    """(cell, status, message) of what ended a torchrun that did not end well."""
    if hung is not None:
        return current, "timeout", hung
    cause = _root_cause(log)
    faults = ranks.faults()
    if cause is not None and cause[0] not in {f["rank"] for f in faults}:
        faults = []  # the first rank to end reported no fault (it was killed): the others' followed from it
    if faults:
        first = faults[0]
        return tuple(first["cell"]), first["status"], f"rank {first['rank']}: {first['error']}"
    who = f"rank {cause[0]} ended ({cause[1]})" if cause else f"torchrun ended ({_signal_name(code)})"
    if current is None:
        last = next((line.strip() for line in reversed(log.splitlines())
                     if line.strip() and not line.startswith(("=", "-", " "))), "")
        return None, "error", f"the ranks reached no cell: {who}" + (f"; {last[:200]}" if last else "")
    where = next((b["text"] for b in ranks.beats() if cause and b["rank"] == cause[0]), None)
    return current, "error", who + (f" during '{where}'" if where else "")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM to the launcher ends its ranks as Ctrl-C does (they run in a session of their own, which a signal to
    the launcher's process group does not reach)."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end(proc) -> None:
    """End a torchrun and every process it started (its own session): SIGTERM, then SIGKILL to whatever is left."""
    import contextlib
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # nothing of it is left
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    proc.wait()


def launch_check(child_args: list[str], nproc: int, device: str, cell_timeout: float | None = None) -> int:
    """`loopmark check --nproc-per-node N`: the check under torchrun; rank 0 prints the verdicts. Its exit status,
    or 1 when a rank failed or hung (named in one line): a cell with no progress within `cell_timeout` and as much
    again (a minute at most) ends every rank, as under `loopmark run`."""
    import sys
    import tempfile
    from pathlib import Path

    env = quiet_ranks_env(nproc)
    limit = launcher_limit(cell_timeout)
    cmd = ranks_command(nproc, ["check", *child_args])
    with tempfile.TemporaryDirectory(prefix="loopmark-ranks-") as where, _terminate_as_interrupt():
        ranks, env[HEARTBEAT_ENV] = _Ranks(Path(where)), where
        code, hung, current, log = _one_torchrun(cmd, env, ranks, limit, nproc, print)
    if hung is not None:
        cell = " ".join(current[:2]) if current else "the check"
        print(f"loopmark check: timeout: {cell}: {hung}", file=sys.stderr)
        return 1
    cause = _root_cause(log)  # a rank that failed (torchrun itself then exits 1)
    if code == 0 or (code == 1 and cause is None):
        return code
    who = f"rank {cause[0]} ended ({cause[1]})" if cause else f"torchrun ended ({_signal_name(code)})"
    print(f"loopmark check: {who}", file=sys.stderr)
    return 1


def launch_trace(child_args: list[str], nproc: int, rendezvous: list[str], ranks_env: str, leftover,
                 cell_timeout: float | None = None):
    """`loopmark trace --nproc-per-node N`: `loopmark trace CHILD_ARGS` under torchrun (`--standalone` unless
    `rendezvous` holds torchrun's rendezvous options), the cores shared out among the ranks. The ranks publish their
    records in a directory named in `ranks_env`, and rank 0 writes them; if it could not (a rank failed and torchrun
    ended the others first, or they hung), `leftover(where)` writes what was published and returns its exit status
    (None: nothing was). Returns (the exit status the results were written with or None, a line naming the rank that
    failed or None).

    A hang: the ranks' collectives wait `cell_timeout` at most (the traced script's process group is given it as its
    timeout, or its own if shorter), so a rank waiting on one that never comes raises, and publishes what it measured;
    with no step on any rank for `launcher_limit(cell_timeout)`, every rank is ended and the line names where each
    one stopped."""
    import tempfile
    from pathlib import Path

    env = quiet_ranks_env(nproc)
    if cell_timeout:
        env[TIMEOUT_ENV] = f"{cell_timeout:g}"
    limit = launcher_limit(cell_timeout)
    with tempfile.TemporaryDirectory(prefix="loopmark-trace-ranks-") as where, \
            tempfile.TemporaryDirectory(prefix="loopmark-ranks-") as beats, _terminate_as_interrupt():
        env[ranks_env], env[HEARTBEAT_ENV] = where, beats
        cmd = ranks_command(nproc, ["trace", *child_args], rendezvous)
        code, hung, _, log = _one_torchrun(cmd, env, _Ranks(Path(beats)), limit, nproc, print,
                                           stalled="no step on any rank in {limit:g} s (--cell-timeout and as much "
                                                   "again, a minute at most)")
        marker = _read_json(Path(where) / "written.json")
        if marker is not None and hung is None:  # rank 0 wrote every rank's cell: its exit status is the trace's
            return marker.get("exit_code"), None
        cause = _root_cause(log)
        failed = (f"timeout: {hung}" if hung is not None else
                  f"rank {cause[0]} ended ({cause[1]})" if cause else
                  f"torchrun ended ({_signal_name(code)})" if code else None)
        return leftover(Path(where)), failed
