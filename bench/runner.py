"""`loopmark run`: every cell (workload x variant x device) through four separate passes.

1. correctness (`bench.correctness`), 2. syncs (`bench.syncs`), 3. memory (`bench.memory`), each on a
freshly built cell, then 4. timing (`bench.timing`), the cells of one workload and device interleaved
round-robin across repeats. No instrument runs inside a timed block.

A cell is finished, and written to results.csv / results.json at once, when its last timed block ends.
A fault stays in its cell: NaN/inf loss -> `diverged`, CUDA out-of-memory -> `oom` (memory freed),
an exception -> `error` with its message, a cell past its time limit -> `timeout`, a GPU-only variant on CPU
-> `skipped`. A workload that cannot be built or staged (its function raises, no test data for an evaluation
variant, fewer samples than one batch) is a fault of its group's cells: `error`, and the next group runs.
A cell's untimed-pass figures are kept in untimed.json until its group is timed, so that `--resume` after an
interrupt does not run those passes again.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench import correctness, distributed
from bench.cell import build_cell, graph_breaks, stage_batches
from bench.env import EnergyMeter, environment
from bench.memory import measure_memory
from bench.syncs import measure_syncs
from bench.timing import LoadWatch, time_block
from loops import Variant, Workload, builtin_names, resolve_variant, resolve_workload
from reports import results
from reports.results import CellSpec, Measurement, baseline_of
from reports.table import printable

DEFAULT_TRAIN_WORKLOADS = ("mlp", "cnn")
DEFAULT_EVAL_WORKLOADS = ("cnn",)
DEFAULT_DDP_WORKLOADS = ("mlp",)  # no BatchNorm: DDP's baseline equals one process on the global batch


@dataclass(frozen=True)
class Settings:
    steps: int = 40  # timed steps per block
    repeats: int = 5  # blocks per cell
    warmup: int = 5  # untimed steps before a cell's first block
    seed: int = 0
    check_epochs: int = correctness.CHECK_EPOCHS  # correctness pass
    check_steps: int | None = None  # the workload's own size, else correctness.CHECK_STEPS
    memory_steps: int = 32  # memory pass: enough step boundaries for a slope
    cell_timeout: float = 600.0  # seconds of work per cell (all its passes and blocks) before it is stopped; 0: none


QUICK = Settings(steps=16, repeats=3, warmup=2, memory_steps=12)


@dataclass
class Group:
    workload: str
    device: str
    variants: list[str]


def plan(devices: list[str], workloads: list[str] | None, variants: list[str] | None,
         extended: bool = False, distributed: bool = False) -> list[Group]:
    """The groups to run; each holds its kind's baseline first (the ratios need it). Without `variants`:
    the seed's idioms, and with `extended` the idioms beyond the seed too. `distributed` (one process per rank): the
    `ddp` variants alone, by default every built-in one, and with `extended` the seed's training idioms under DDP."""
    groups = []
    defaults = {"train": DEFAULT_TRAIN_WORKLOADS, "eval": DEFAULT_EVAL_WORKLOADS, "ddp": DEFAULT_DDP_WORKLOADS}
    for device in devices:
        for kind in ("ddp",) if distributed else ("train", "eval"):
            if variants is not None:
                names = [v for v in variants if resolve_variant(v).kind == kind]
            elif kind == "ddp":
                names = builtin_names("ddp") + ([f"{baseline_of('ddp')}+{n}" for n in builtin_names("train", False)
                                                 if n != baseline_of("train")] if extended else [])
            else:
                names = builtin_names(kind, extended)
            if not names:
                continue
            default = defaults[kind]
            for workload in workloads or default:
                base = baseline_of(kind)
                groups.append(Group(workload, device, [base] + [n for n in names if n != base]))
    return groups


def shard(groups: list[Group], index: int, count: int) -> list[Group]:
    """Shard `index` of `count` (1-based) of the planned groups, for `loopmark run --shard I/N`: a workload's groups
    on one device stay in one shard (a group's baseline is timed interleaved with its variants), shards get about as
    many cells each (the largest bundles first, each to the shard with the fewest cells so far, the first on a
    tie), and each runs its groups in plan order. The same plan always splits the same way. ValueError (one line)
    when there are fewer bundles than shards: a shard would run nothing."""
    bundles: dict[tuple[str, str], list[int]] = {}
    for i, g in enumerate(groups):
        bundles.setdefault((g.workload, g.device), []).append(i)
    if len(bundles) < count:
        raise ValueError(f"--shard {index}/{count}: the plan has {len(bundles)} (workload, device) pair(s) to share "
                         f"among {count} shards; use at most {len(bundles)} shards")
    cells = {key: sum(len(groups[i].variants) for i in members) for key, members in bundles.items()}
    load, owner = [0] * count, {}
    for key in sorted(bundles, key=lambda k: -cells[k]):  # stable: equal sizes keep plan order
        target = min(range(count), key=lambda s: (load[s], s))
        owner[key] = target
        load[target] += cells[key]
    return [g for g in groups if owner[(g.workload, g.device)] == index - 1]


def cell_spec(workload: Workload | str, variant: Variant, device: torch.device, s: Settings,
              ranks: int | None = None) -> CellSpec:
    """What a cell is: named by the workload's own name, whatever name it was asked for by (a workload that could
    not be made is named as it was asked for, `package.module:function`). A distributed cell's batch is the global
    one, every rank's part (`ranks`, by default the process group's size)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else environment([])["cpu_model"]
    wname, batch = (workload, None) if isinstance(workload, str) else (workload.name, workload.batch_size)
    ranks = (ranks or distributed.world()[1]) if variant.kind == "ddp" else None
    return CellSpec(workload=wname, variant=variant.name, kind=variant.kind, device=device.type,
                    idiom=variant.idiom, description=variant.description, device_name=name,
                    torch_version=torch.__version__, batch_size=batch * ranks if batch and ranks else batch,
                    steps=s.steps, repeats=s.repeats, warmup_steps=s.warmup,
                    expected_verdict=variant.expected_for(wname, ranks), ranks=ranks)


class CellTimeout(BaseException):
    """A cell ran past its time limit (`Settings.cell_timeout`). A BaseException, as KeyboardInterrupt is, so that
    a loop's own `except Exception` does not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float, message: str):
    """Raise CellTimeout(message) in the main thread once `seconds` have passed (SIGALRM through setitimer).

    Python runs a signal handler between bytecodes, so a loop written in Python stops at once, and a loop in torch
    stops when the operator running returns; a single call into C that never returns (a deadlocked collective, a
    kernel that never ends) cannot be interrupted. Without setitimer (Windows), or outside the main thread, there is
    no limit."""
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        if _importing(frame):  # a module left half imported would break every later cell: stop after the import
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            return
        raise CellTimeout(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _importing(frame) -> bool:
    """Whether `frame` or a caller of it is importing a module (torch imports parts of itself on first use)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class Budget:
    """A cell's time limit, spent over every stretch of its work: its untimed passes, its warm-up, each of its timed
    blocks (the limit is armed before a block and disarmed after it, never inside)."""

    def __init__(self, seconds: float):
        self.seconds, self.spent = seconds, 0.0

    @contextlib.contextmanager
    def __call__(self):
        if not self.seconds:
            yield
            return
        message = f"the cell ran past its time limit of {self.seconds:g} s (--cell-timeout)"
        if self.spent >= self.seconds:
            raise CellTimeout(message)
        start = time.monotonic()
        try:
            with time_limit(self.seconds - self.spent, message):
                yield
        finally:
            self.spent += time.monotonic() - start


# what a cell's code may raise and stay a fault of that cell: an exception (CUDA out-of-memory included), a loop
# that calls sys.exit(), which must not end the run with the cells after it unmeasured, or its time limit
CELL_FAULTS = (Exception, SystemExit, CellTimeout)


def fault_text(exc: BaseException) -> str:
    """One line saying what went wrong in a cell."""
    if isinstance(exc, SystemExit):
        return f"the loop called sys.exit({exc.code!r})"
    if isinstance(exc, CellTimeout):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".split("\n")[0][:300]


def _fault(m: Measurement, exc: BaseException, built: bool = True) -> None:
    """Record a cell's fault; free what a built cell left (not `built`: the cell was never built, nothing to free)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        m.fault("oom", str(exc).split("\n")[0][:300])
    elif isinstance(exc, CellTimeout):
        m.fault("timeout", fault_text(exc))
    else:
        m.fault("error", fault_text(exc))
    if not built:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warm(cell, batches: list, warmup: int) -> None:
    if warmup:
        cell.epoch(cell.batches(batches[:warmup]))


def untimed_passes(workload, variant, device, s: Settings, staged: list, cache: dict, say=None,
                   record: dict | None = None) -> dict:
    """The correctness, sync and memory passes, each on a freshly built cell; their figures, added to `record`
    as each pass ends (a fault or a time limit in a later pass keeps the earlier passes' figures). `say(name)` is
    told which pass starts."""
    say = say or (lambda name: None)
    record = record if record is not None else {}
    say("syncs")
    cell = build_cell(workload, variant, device, s.seed)
    syncs = measure_syncs(cell, staged, warmup=s.warmup, device_buffers=distributed.collective_buffers)
    record.update(syncs)
    if variant.kind == "ddp":
        say("collectives")
        record.update(distributed.measure_collectives(cell, staged))
    say("correctness")
    record.update(correctness.check(workload, variant, device, s.check_epochs, s.check_steps, s.seed, cache, syncs))
    record.update(syncs)
    say("memory")
    cell = build_cell(workload, variant, device, s.seed)
    _warm(cell, staged, s.warmup)
    cycled = [staged[i % len(staged)] for i in range(max(s.memory_steps, len(staged)))]
    record.update(measure_memory(cell, cycled))
    record["param_tensors"] = sum(1 for p in cell.model.parameters() if p.requires_grad)
    return record


def _finite(reported) -> bool:
    value = reported[0] if isinstance(reported, tuple) else reported
    if value is None:  # a loop that reports no epoch loss
        return True
    if isinstance(value, torch.Tensor):
        value = float(value.detach())
    return math.isfinite(float(value))


# the settings a cell's figures depend on, kept in results.json's environment: `--resume` finishes a run only under them
MEASURED_SETTINGS = ("steps", "repeats", "warmup", "seed", "check_epochs", "check_steps", "memory_steps")
CELL_SETTINGS = {"steps": "steps", "repeats": "repeats", "warmup": "warmup_steps"}  # also in every cell record


def measured_settings(s: Settings) -> dict:
    return {name: getattr(s, name) for name in MEASURED_SETTINGS}


def check_resumable(path, env: dict, records: list[dict], s: Settings) -> None:
    """ValueError (one line) if the cells of `path` were measured under other settings than `s`: finishing them
    would mix two runs' settings in one file. Files written before results.json kept the settings are checked on
    what each cell holds (steps, repeats, warm-up)."""
    now, stored = measured_settings(s), env.get("settings")
    if isinstance(stored, dict):
        differ = {k: stored[k] for k in MEASURED_SETTINGS if k in stored and stored[k] != now[k]}
    else:
        differ = {}
        for r in records:
            differ.update({k: r[f] for k, f in CELL_SETTINGS.items()
                           if k not in differ and r.get(f) is not None and r[f] != now[k]})
    if differ:
        then = ", ".join(f"{k} {short(v, 40)}" for k, v in differ.items())
        raise ValueError(f"--resume: {path} was measured with {then}, this run would use "
                         f"{', '.join(f'{k} {now[k]}' for k in differ)}; finish it with the settings it was started "
                         "with (--quick, --steps, --repeats, --warmup, --seed), or start again with --overwrite")


def hold_directory(out_dir: Path) -> int | None:
    """Lock `out_dir` (made if need be) for this run: a descriptor holding an exclusive `flock` on it, until closed.
    ValueError (one line) if another run holds it: both would rewrite results.json from their own cells, each
    dropping the other's. None where there are no such locks."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir, os.O_RDONLY)
    except OSError as exc:
        raise ValueError(f"cannot write to {out_dir} ({exc.strerror or results.one_line(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{out_dir}: another loopmark run is writing its results there; wait until it ends, "
                         "or choose another --out") from None
    except OSError:  # a file system without locks
        os.close(fd)
        return None
    return fd


class Runner:
    """Runs groups of cells. `progress(record)` is called as each cell is saved, `status(text)` as each pass and
    each round of timed blocks starts ("mlp cpu: timing block 2/5"), never inside a timed block."""

    writes = True  # writes the results (in a distributed run, rank 0 alone does)

    def __init__(self, out_dir: Path, settings: Settings, resume: bool = False, progress=None, status=None):
        self.out_dir, self.s = out_dir, settings
        self.env = {**environment(), "settings": measured_settings(settings)}
        self.records: dict[tuple, dict] = {}
        self.cell: tuple | None = None  # the cell whose pass or timed block runs now
        self._lock = hold_directory(Path(out_dir)) if self.writes else None  # one run at a time writes to a directory
        if resume and (out_dir / "results.json").exists():
            for r in self._resumable():
                if r.get("status") in results.FINISHED:
                    self.records[results.cell_key(r)] = r
        self.progress = progress or _plain_progress
        self.status = status or _plain_status
        self.untimed = UntimedStore(self.out_dir, settings, resume, self.writes)
        self._eta = _Estimate()

    def _resumable(self) -> list[dict]:
        """The cells of the results.json `--resume` finishes; ValueError (one line) if it is unreadable or was
        measured under other settings."""
        try:
            env, records = results.read_results(self.out_dir, mend=True)
            check_resumable(self.out_dir / "results.json", env, records, self.s)
        except BaseException:
            self.close()
            raise
        return records

    def close(self) -> None:
        """Let another run write to the output directory (at the end of `run`)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            os.close(lock)

    __del__ = close

    def finished(self, workload: str, variant: str, device: str) -> bool:
        return (workload, variant, device) in self.records

    def save(self, spec: CellSpec, m: Measurement) -> None:
        record = results.record(spec, m, self.s.seed)
        self.records[spec.key] = record
        if self.writes:
            results.write_results(self.out_dir, self.env, list(self.records.values()))
            self.progress(record)

    def run(self, groups: list[Group]) -> list[dict]:
        """Run the groups; the output directory stays this run's until they end, or an interrupt ends them."""
        try:
            if self._lock is None and self.writes:
                self._lock = hold_directory(Path(self.out_dir))
            return self._run(groups)
        finally:
            self.close()

    def _run(self, groups: list[Group]) -> list[dict]:
        self._eta.start(sum(len(g.variants) for g in groups))
        for g in groups:
            try:
                workload = resolve_workload(g.workload)  # cells are stored under the workload's own name
            except CELL_FAULTS as exc:  # the user's workload function raised: a fault of its cells
                self._group_fault(g, exc)
                self._eta.skip(len(g.variants))
                continue
            if workload.name != g.workload:  # its cells' `error` from a run where the function raised, now replaced
                for v in g.variants:
                    self.records.pop((g.workload, v, g.device), None)
            if all(self.finished(workload.name, v, g.device) for v in g.variants):
                self._eta.skip(len(g.variants))
                continue
            self.run_group(g, workload)
        return list(self.records.values())

    def _group_fault(self, g: Group, exc: BaseException) -> None:
        """Every cell of a group whose workload could not be made: `error`, stored under the name it was asked by."""
        device = torch.device(g.device)
        for v in g.variants:
            spec = cell_spec(g.workload, resolve_variant(v), device, self.s)
            m = Measurement()
            _fault(m, exc, built=False)
            self.save(spec, m)

    def before_block(self) -> None:
        """Just before a timed block, outside its timed region (distributed: the ranks start it together)."""

    def after_block(self, block: list[float], m: Measurement) -> list[float]:
        """A timed block's per-step seconds as the cell keeps them (distributed: the slowest rank's)."""
        return block

    def _say(self, g: str, text: str) -> None:
        left = self._eta.left()
        self.status(f"{g}: {text}" + (f" (about {_duration(left)} left)" if left is not None else ""))

    def run_group(self, g: Group, workload: Workload) -> None:
        s, device = self.s, torch.device(g.device)
        # finished cells are skipped; the baseline is timed again whenever others run (their ratio's reference)
        variants = [resolve_variant(v) for i, v in enumerate(g.variants)
                    if i == 0 or not self.finished(workload.name, v, g.device)]
        kind = variants[0].kind
        where = f"{workload.name} {device.type}"
        self._eta.group(len(variants), len(g.variants))
        try:  # no test data, a dataset smaller than one batch: a fault of every cell of the group
            staged, group_fault = stage_batches(workload, "test" if kind == "eval" else "train", s.steps, device,
                                                distributed.shard() if kind == "ddp" else None), None
        except CELL_FAULTS as exc:
            staged, group_fault = [], exc
        cache: dict = {}
        pending: dict[str, tuple[CellSpec, Measurement]] = {}
        budgets = {variant.name: Budget(s.cell_timeout) for variant in variants}
        unrun = None  # the baseline's cell, when it faulted
        for i, variant in enumerate(variants, 1):
            spec, m = cell_spec(workload, variant, device, s), Measurement()
            self.cell = spec.key
            if variant.requires == "cuda" and device.type != "cuda":
                m.fault("skipped", "needs a CUDA GPU")
                self.save(spec, m)
                continue
            if group_fault is not None:
                _fault(m, group_fault, built=False)
                self.save(spec, m)
                continue
            kept = self.untimed.get(spec.key)
            if kept is not None:  # measured before an interrupt, under the same settings
                self._say(where, f"untimed passes {i}/{len(variants)} ({variant.name}) kept from an earlier run")
                m.figures.update(kept)
                pending[variant.name] = spec, m
                continue
            try:
                which = f"{i}/{len(variants)} ({variant.name})"
                with budgets[variant.name]():
                    untimed_passes(workload, variant, device, s, staged, cache,
                                   lambda name, which=which: self._say(where, f"{name} {which}"), m.figures)
            except CELL_FAULTS as exc:  # the figures of the passes that ended before it are kept
                _fault(m, exc)
                if i == 1 and variant.name == baseline_of(kind) and len(variants) > 1 and m.status == "error":
                    unrun = spec, m  # decided once the others have run
                    continue
                self.save(spec, m)
                continue
            self.untimed.put(spec.key, dict(m.figures))
            pending[variant.name] = spec, m
        if unrun is not None:
            spec, m = unrun
            if pending:  # the yardstick the plan adds, on a workload only the user's loops can run (dict batches,
                # two optimizers): not a fault of the run, when the user's loops ran
                m.fault("skipped", f"the built-in {spec.variant} cannot run this workload ({m.error}); the other "
                                   "variants are judged and timed without it")
            self.save(spec, m)
        timed = bool(pending)
        if timed:
            self._time(workload, device, variants, staged, pending, budgets)
        self._eta.finish(timed)
        self.untimed.drop([(workload.name, variant.name, device.type) for variant in variants])

    def _time(self, workload, device, variants, staged, pending: dict, budgets: dict | None = None) -> None:
        """Interleaved timing of the pending cells; each is saved as its last block ends."""
        s = self.s
        where = f"{workload.name} {device.type}"
        budgets = budgets if budgets is not None else {}
        budget = {v.name: budgets.get(v.name) or Budget(s.cell_timeout) for v in variants}
        cells = {}
        meter = EnergyMeter(device)
        built = {}
        # the cells timed here, round by round, share this mark: only their blocks pair up (reports.results.derive)
        rounds = f"{os.getpid()}-{time.time_ns()}"
        for _, m in pending.values():
            m.figures["timing_rounds"] = rounds
        self._say(where, f"warm-up of {len(pending)} cell(s) before timing")
        for variant in variants:
            if variant.name in pending:
                try:
                    with budget[variant.name]():
                        built[variant.name] = build_cell(workload, variant, device, s.seed)
                except CELL_FAULTS as exc:
                    _fault(pending[variant.name][1], exc)
                    self.save(*pending.pop(variant.name))
        for name, cell in built.items():
            m = pending[name][1]
            try:
                with budget[name]():
                    breaks, start = graph_breaks(), time.perf_counter()
                    _warm(cell, staged, s.warmup)  # compile time lands here, never in a timed block
                    m.figures.update(warmup_time_s=time.perf_counter() - start,
                                     graph_breaks=graph_breaks() - breaks)
                cells[name] = cell
            except CELL_FAULTS as exc:
                _fault(m, exc)
                self.save(*pending.pop(name))
        for r in range(s.repeats):
            if cells:
                self._say(where, f"timing block {r + 1}/{s.repeats}")
            for name in list(cells):
                m = pending[name][1]
                self.cell = pending[name][0].key
                try:
                    self.before_block()
                    e0 = meter.read()
                    # the limit is armed before the block's first mark and disarmed after its last; the load
                    # readings (LoadWatch) are taken outside both
                    with LoadWatch() as load, budget[name]():
                        block, reported = time_block(cells[name], staged)
                    e1 = meter.read()
                    block = self.after_block(block, m)
                    if e0 is not None and e1 is not None:
                        m.energy_j.append(e1 - e0)
                    m.blocks.append(block)
                    m.block_load.append(load.figures)
                    if not _finite(reported):
                        m.fault("diverged", f"non-finite loss in block {r + 1}")
                except CELL_FAULTS as exc:
                    _fault(m, exc)
                if m.status != "ok" or r == s.repeats - 1:
                    del cells[name]
                    self.save(*pending.pop(name))


def progress_line(record: dict) -> str:
    """A finished cell in one line: where, status, samples/s, verdict, and a fault's message (truncated)."""
    sps = record.get("samples_per_s")
    rate = f"{sps:,.0f} samples/s" if sps else "-"
    mark = f" (expected {record['expected_verdict']})" if record.get("verdict_as_expected") is False else ""
    error = f"  {short(record['error'])}" if record.get("status") != "ok" and record.get("error") else ""
    return printable(f"{record['device']:4s} {record['workload']:<12s} {record['variant']:<38s} {record['status']:<8s} "
                     f"{rate:>18s}  verdict={record.get('verdict') or '-'}{mark}{error}")


def short(text: str, width: int = 100) -> str:
    """One line of at most `width` characters, without terminal control sequences."""
    text = " ".join(printable(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain_progress(record: dict) -> None:
    print(progress_line(record), file=sys.stderr, flush=True)


def _plain_status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Estimate:
    """The time left: seconds per cell over the groups timed so far, times the cells still to run, less the time
    the current group has run. None until a group has been timed."""

    def __init__(self):
        self.total = self.done = 0
        self.spent = 0.0  # in groups that were timed
        self.cells = 0  # cells of those groups
        self.current: tuple[int, int, float] | None = None  # (cells run, cells planned, start) of the group running

    def start(self, total: int) -> None:
        self.total, self.done, self.current = total, 0, None

    def skip(self, cells: int) -> None:
        self.done += cells

    def group(self, cells: int, planned: int) -> None:
        self.current = cells, planned, time.monotonic()

    def finish(self, timed: bool) -> None:
        """The current group has ended; only a group that reached the timing pass tells how long cells take."""
        if self.current is not None:
            cells, planned, start = self.current
            if timed:
                self.spent += time.monotonic() - start
                self.cells += cells
            self.done += planned
            self.current = None

    def left(self) -> float | None:
        if not self.cells:
            return None
        running = time.monotonic() - self.current[2] if self.current else 0.0
        return max(self.spent / self.cells * (self.total - self.done) - running, 0.0)


UNTIMED_FILE = "untimed.json"


class UntimedStore:
    """The untimed passes' figures of cells whose group is not timed yet, in untimed.json beside results.json, so
    that `--resume` after an interrupt does not run those passes again. A cache: rewritten (atomically) after each
    cell's untimed passes, emptied as its group ends; one made under other settings, or unreadable, is ignored, and
    a run without --resume starts it anew. results.json never holds these unfinished cells."""

    def __init__(self, out_dir: Path, s: Settings, resume: bool, persist: bool = True):
        import bench

        self.persist = persist  # False: kept in memory alone (a distributed run's ranks other than 0)
        self.path = Path(out_dir) / UNTIMED_FILE
        self.settings = {"steps": s.steps, "warmup": s.warmup, "seed": s.seed, "check_epochs": s.check_epochs,
                         "check_steps": s.check_steps, "memory_steps": s.memory_steps,
                         "torch": torch.__version__, "loopmark": bench.__version__}
        self.cells: dict[tuple, dict] = self._read() if resume else {}
        self.fresh = not resume  # what an earlier run left is not this run's

    def _read(self) -> dict:
        try:
            doc = results.read_json(self.path)  # bounded: a FIFO or /dev/zero there is refused, not read
            if not isinstance(doc, dict) or doc.get("settings") != self.settings:
                return {}
            return {tuple(c["cell"]): dict(c["figures"]) for c in doc["cells"]}
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return {}

    def get(self, key: tuple) -> dict | None:
        return self.cells.get(tuple(key))

    def put(self, key: tuple, figures: dict) -> None:
        self.cells[tuple(key)] = figures
        self._write()

    def drop(self, keys: list[tuple]) -> None:
        dropped = [self.cells.pop(tuple(k), None) is not None for k in keys]
        if any(dropped) or self.fresh:
            self._write()

    def _write(self) -> None:
        self.fresh = False
        if not self.persist:
            return
        with contextlib.suppress(OSError, ValueError, TypeError):  # a cache: losing it costs time, not results
            if not self.cells:
                self.path.unlink(missing_ok=True)
                return
            doc = {"settings": self.settings,
                   "cells": [{"cell": list(k), "figures": f} for k, f in self.cells.items()]}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            results.atomic_write(self.path, json.dumps(results._clean(doc)))


def replace_settings(s: Settings, **changes) -> Settings:
    return replace(s, **{k: v for k, v in changes.items() if v is not None})


# what each rank measures for itself: kept per rank (`rank_<name>`, rank order), the worst rank's as the cell's figure
PER_RANK = ("syncs_per_step", "peak_memory_bytes", "memory_growth_bytes_per_step", "collectives_per_step",
            "comm_bytes_per_step")
EXIT_CELL_FAULT = 3  # a rank's exit status when a cell of its faulted (its launcher records the cell and goes on)


class DistributedRunner(Runner):
    """The runner of one rank of a distributed run (`bench.distributed`): every rank runs every pass and block of
    every cell in the same order, and rank 0 alone writes the results.

    Each timed block starts on a barrier, outside its timed region, and keeps per step the slowest rank's time. A
    cell's per-rank figures (`PER_RANK`) are gathered when it is saved. A fault in a cell on any rank ends this rank's
    process after writing what happened where its launcher reads it: the other ranks would wait for it in their next
    collective; the launcher records the cell and starts the ranks again for the cells after it."""

    def __init__(self, out_dir: Path, settings: Settings, resume: bool = False, progress=None, status=None):
        self.rank, self.ranks = distributed.world()
        self.writes = self.rank == 0
        super().__init__(out_dir, settings, resume and self.writes, progress, status)
        # every rank skips the cells rank 0 has finished, and no rank keeps untimed passes across runs: the ranks
        # must run the same passes, or their collectives would not pair
        for key in distributed.gather(sorted(self.records))[0]:
            self.records.setdefault(tuple(key), {})
        self.untimed = UntimedStore(self.out_dir, settings, False, persist=False)
        self.env.update(ranks=self.ranks, backend=distributed.backend(), flight_recorder=distributed.flight_recorder())

    def _say(self, g: str, text: str) -> None:
        super()._say(g, text)
        distributed.heartbeat(self.cell, text)

    def before_block(self) -> None:
        distributed.barrier()

    def after_block(self, block: list[float], m: Measurement) -> list[float]:
        blocks = distributed.gather(block)
        m.figures.setdefault("rank_block_medians_s", []).append([float(sorted(b)[len(b) // 2]) if b else None
                                                                for b in blocks])
        return [max(times) for times in zip(*blocks)]

    def save(self, spec: CellSpec, m: Measurement) -> None:
        if m.status in results.FAULTS:
            distributed.report_fault(spec.key, m.status, m.error)
            if m.status == "timeout":  # the launcher asks every rank where it is before the ranks are ended
                time.sleep(3)
            os._exit(EXIT_CELL_FAULT)
        everyone = distributed.gather({k: m.figures.get(k) for k in PER_RANK})
        for k in PER_RANK:
            values = [f[k] for f in everyone]
            m.figures[f"rank_{k}"] = values
            numbers = [v for v in values if isinstance(v, (int, float))]
            if numbers:
                m.figures[k] = max(numbers)
        super().save(spec, m)
