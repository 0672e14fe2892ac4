"""`loopmark run`: every cell (workload x variant x device) through four separate passes.

1. correctness (`bench.correctness`), 2. syncs (`bench.syncs`), 3. memory (`bench.memory`), each on a
freshly built cell, then 4. timing (`bench.timing`), the cells of one workload and device interleaved
round-robin across repeats. No instrument runs inside a timed block.

A cell is finished, and written to results.csv / results.json at once, when its last timed block ends.
A fault stays in its cell: NaN/inf loss -> `diverged`, CUDA out-of-memory -> `oom` (memory freed),
an exception -> `error` with its message, a GPU-only variant on CPU -> `skipped`.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench import correctness
from bench.cell import build_cell, graph_breaks, stage_batches
from bench.env import EnergyMeter, environment
from bench.memory import measure_memory
from bench.syncs import measure_syncs
from bench.timing import time_block
from loops import Variant, Workload, builtin_names, resolve_variant, resolve_workload
from reports import results
from reports.results import CellSpec, Measurement, baseline_of

DEFAULT_TRAIN_WORKLOADS = ("mlp", "cnn")
DEFAULT_EVAL_WORKLOADS = ("cnn",)


@dataclass(frozen=True)
class Settings:
    steps: int = 40  # timed steps per block
    repeats: int = 5  # blocks per cell
    warmup: int = 5  # untimed steps before a cell's first block
    seed: int = 0
    check_epochs: int = correctness.CHECK_EPOCHS  # correctness pass
    check_steps: int | None = None  # the workload's own size, else correctness.CHECK_STEPS
    memory_steps: int = 32  # memory pass: enough step boundaries for a slope


QUICK = Settings(steps=16, repeats=3, warmup=2, memory_steps=12)


@dataclass
class Group:
    workload: str
    device: str
    variants: list[str]


def plan(devices: list[str], workloads: list[str] | None, variants: list[str] | None,
         extended: bool = False) -> list[Group]:
    """The groups to run; each holds its kind's baseline first (the ratios need it). Without `variants`:
    the seed's idioms, and with `extended` the idioms beyond the seed too."""
    groups = []
    for device in devices:
        for kind in ("train", "eval"):
            names = builtin_names(kind, extended) if variants is None else [v for v in variants
                                                                             if resolve_variant(v).kind == kind]
            if not names:
                continue
            default = DEFAULT_TRAIN_WORKLOADS if kind == "train" else DEFAULT_EVAL_WORKLOADS
            for workload in workloads or default:
                base = baseline_of(kind)
                groups.append(Group(workload, device, [base] + [n for n in names if n != base]))
    return groups


def cell_spec(workload: Workload, variant: Variant, device: torch.device, s: Settings) -> CellSpec:
    """What a cell is: named by the workload's own name, whatever name it was asked for by."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else environment([])["cpu_model"]
    return CellSpec(workload=workload.name, variant=variant.name, kind=variant.kind, device=device.type,
                    idiom=variant.idiom, description=variant.description, device_name=name,
                    torch_version=torch.__version__, batch_size=workload.batch_size, steps=s.steps,
                    repeats=s.repeats, warmup_steps=s.warmup, expected_verdict=variant.expected_for(workload.name))


# what a cell's code may raise and stay a fault of that cell: an exception (CUDA out-of-memory included), or a
# loop that calls sys.exit(), which must not end the run with the cells after it unmeasured
CELL_FAULTS = (Exception, SystemExit)


def fault_text(exc: BaseException) -> str:
    """One line saying what went wrong in a cell."""
    if isinstance(exc, SystemExit):
        return f"the loop called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}".split("\n")[0][:300]


def _fault(m: Measurement, exc: BaseException) -> None:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        m.fault("oom", str(exc).split("\n")[0][:300])
    else:
        m.fault("error", fault_text(exc))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warm(cell, batches: list, warmup: int) -> None:
    if warmup:
        cell.epoch(cell.batches(batches[:warmup]))


def untimed_passes(workload, variant, device, s: Settings, staged: list, cache: dict) -> dict:
    """The correctness, sync and memory passes, each on a freshly built cell; their figures."""
    cell = build_cell(workload, variant, device, s.seed)
    _warm(cell, staged, s.warmup)
    syncs = measure_syncs(cell, staged)
    record = correctness.check(workload, variant, device, s.check_epochs, s.check_steps, s.seed, cache, syncs)
    record.update(syncs)
    cell = build_cell(workload, variant, device, s.seed)
    _warm(cell, staged, s.warmup)
    cycled = [staged[i % len(staged)] for i in range(max(s.memory_steps, len(staged)))]
    record.update(measure_memory(cell, cycled))
    record["param_tensors"] = sum(1 for p in cell.model.parameters() if p.requires_grad)
    return record


def _finite(reported) -> bool:
    value = reported[0] if isinstance(reported, tuple) else reported
    if isinstance(value, torch.Tensor):
        value = float(value.detach())
    return math.isfinite(float(value))


class Runner:
    def __init__(self, out_dir: Path, settings: Settings, resume: bool = False, progress=None):
        self.out_dir, self.s = out_dir, settings
        self.env = environment()
        self.records: dict[tuple, dict] = {}
        if resume and (out_dir / "results.json").exists():
            for r in results.read_results(out_dir)[1]:
                if r.get("status") in results.FINISHED:
                    self.records[results.cell_key(r)] = r
        self.progress = progress or _plain_progress

    def finished(self, workload: str, variant: str, device: str) -> bool:
        return (workload, variant, device) in self.records

    def save(self, spec: CellSpec, m: Measurement) -> None:
        record = results.record(spec, m, self.s.seed)
        self.records[spec.key] = record
        results.write_results(self.out_dir, self.env, list(self.records.values()))
        self.progress(record)

    def run(self, groups: list[Group]) -> list[dict]:
        for g in groups:
            workload = resolve_workload(g.workload)  # cells are stored under the workload's own name
            if all(self.finished(workload.name, v, g.device) for v in g.variants):
                continue
            self.run_group(g, workload)
        return list(self.records.values())

    def run_group(self, g: Group, workload: Workload) -> None:
        s, device = self.s, torch.device(g.device)
        # finished cells are skipped; the baseline is timed again whenever others run (their ratio's reference)
        variants = [resolve_variant(v) for i, v in enumerate(g.variants)
                    if i == 0 or not self.finished(workload.name, v, g.device)]
        kind = variants[0].kind
        staged = stage_batches(workload, "test" if kind == "eval" else "train", s.steps, device)
        cache: dict = {}
        pending: dict[str, tuple[CellSpec, Measurement]] = {}
        for variant in variants:
            spec, m = cell_spec(workload, variant, device, s), Measurement()
            if variant.requires == "cuda" and device.type != "cuda":
                m.fault("skipped", "needs a CUDA GPU")
                self.save(spec, m)
                continue
            try:
                m.figures.update(untimed_passes(workload, variant, device, s, staged, cache))
            except CELL_FAULTS as exc:
                _fault(m, exc)
                self.save(spec, m)
                continue
            pending[variant.name] = spec, m
        self._time(workload, device, variants, staged, pending)

    def _time(self, workload, device, variants, staged, pending: dict) -> None:
        """Interleaved timing of the pending cells; each is saved as its last block ends."""
        s = self.s
        cells = {}
        meter = EnergyMeter(device)
        built = {}
        for variant in variants:
            if variant.name in pending:
                try:
                    built[variant.name] = build_cell(workload, variant, device, s.seed)
                except CELL_FAULTS as exc:
                    _fault(pending[variant.name][1], exc)
                    self.save(*pending.pop(variant.name))
        for name, cell in built.items():
            m = pending[name][1]
            try:
                breaks, start = graph_breaks(), time.perf_counter()
                _warm(cell, staged, s.warmup)  # compile time lands here, never in a timed block
                m.figures.update(warmup_time_s=time.perf_counter() - start, graph_breaks=graph_breaks() - breaks)
                cells[name] = cell
            except CELL_FAULTS as exc:
                _fault(m, exc)
                self.save(*pending.pop(name))
        for r in range(s.repeats):
            for name in list(cells):
                m = pending[name][1]
                try:
                    e0 = meter.read()
                    block, reported = time_block(cells[name], staged)
                    e1 = meter.read()
                    if e0 is not None and e1 is not None:
                        m.energy_j.append(e1 - e0)
                    m.blocks.append(block)
                    if not _finite(reported):
                        m.fault("diverged", f"non-finite loss in block {r + 1}")
                except CELL_FAULTS as exc:
                    _fault(m, exc)
                if m.status != "ok" or r == s.repeats - 1:
                    del cells[name]
                    self.save(*pending.pop(name))


def _plain_progress(record: dict) -> None:
    sps = record.get("samples_per_s")
    rate = f"{sps:,.0f} samples/s" if sps else "-"
    mark = f" (expected {record['expected_verdict']})" if record.get("verdict_as_expected") is False else ""
    print(f"{record['device']:4s} {record['workload']:<12s} {record['variant']:<38s} {record['status']:<8s} "
          f"{rate:>18s}  verdict={record.get('verdict')}{mark}", file=sys.stderr, flush=True)


def replace_settings(s: Settings, **changes) -> Settings:
    return replace(s, **{k: v for k, v in changes.items() if v is not None})
