"""`loopmark selfcheck`: measure the harness itself on this machine.

1. Overhead of the timing pass: the same baseline loop over the same batches, timed by `time_block`
   (a mark per step) and as a bare hand-written loop timed as a whole, interleaved block by block. The
   fastest block of each is compared: noise on a shared machine only ever adds time, so the minimum is
   the estimate of the intrinsic cost that noise disturbs least.
2. Agreement with `torch.utils.benchmark.Timer.blocked_autorange` on the same step (one step of the
   seed's loop), the two measurements interleaved: median per-step time from each.
3. Spread of `ratio_to_baseline` (tensor_sum / baseline) over 3 independent interleaved runs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.utils.benchmark as tbench

from bench.cell import build_cell, stage_batches
from bench.timing import time_block
from loops import resolve_variant, resolve_workload
from reports.table import format_table

# overhead: the per-step marks' cost; loop: the canonical loop's own cost over the seed's loop written out by hand
GOALS = {"cpu": {"overhead": 0.02, "loop": 0.01, "agreement": 0.03, "spread": 0.03},
         "cuda": {"overhead": 0.02, "loop": 0.01, "agreement": 0.02, "spread": 0.03}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bare_step(model, optimizer, criterion, data, labels, device) -> float:
    data, labels = data.to(device), labels.to(device)
    optimizer.zero_grad()
    loss = criterion(model(data), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def _bare_block(cell, batches) -> float:
    """The seed's loop written out by hand, timed as a whole (one sync at the end on CUDA)."""
    model, optimizer, criterion = cell.model, cell.optimizer, cell.criterion
    model.train()
    _sync(cell.device)
    start = time.perf_counter()
    train_loss = 0.0
    device = cell.device
    for data, labels in batches:
        data, labels = data.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = criterion(model(data), labels)
        loss.backward()
        optimizer.step()
        train_loss += loss.item()
    _sync(device)
    return time.perf_counter() - start


def _whole_block(cell, batches) -> float:
    """The variant's own loop over `batches`, timed as a whole: no per-step marks."""
    _sync(cell.device)
    start = time.perf_counter()
    cell.epoch(batches)
    _sync(cell.device)
    return time.perf_counter() - start


def overhead(workload, device, staged, repeats: int = 20) -> tuple[float, float]:
    """(marks: time_block vs the same loop timed whole, loop: the canonical loop vs a bare hand-written one)."""
    base = resolve_variant("baseline")
    cells = [build_cell(workload, base, device) for _ in range(3)]
    for cell in cells:
        cell.epoch(staged[:5])
    timed, whole, bare = [], [], []
    for _ in range(repeats):
        timed.append(sum(time_block(cells[0], staged)[0]))
        whole.append(_whole_block(cells[1], staged))
        bare.append(_bare_block(cells[2], staged))
    return float(min(timed) / min(whole) - 1), float(min(whole) / min(bare) - 1)


def agreement(workload, device, staged) -> tuple[float, float, float]:
    cell = build_cell(workload, resolve_variant("baseline"), device)
    cell.epoch(staged[:5])
    data, labels = staged[0]
    timer = tbench.Timer(stmt="step(model, optimizer, criterion, data, labels, device)",
                         globals={"step": _bare_step, "model": cell.model, "optimizer": cell.optimizer,
                                  "criterion": cell.criterion, "data": data, "labels": labels,
                                  "device": device},
                         num_threads=torch.get_num_threads())
    ours, theirs = [], []
    for _ in range(9):
        ours += time_block(cell, staged)[0]
        theirs.append(timer.blocked_autorange(min_run_time=0.3).median)
    mine, theirs = float(np.median(ours)), float(np.median(theirs))
    return mine, theirs, mine / theirs - 1


def ratio_spread(workload, device, staged, runs: int = 3, repeats: int = 11) -> list[float]:
    ratios = []
    for _ in range(runs):
        cells = {name: build_cell(workload, resolve_variant(name), device) for name in ("baseline", "tensor_sum")}
        for cell in cells.values():
            cell.epoch(staged[:5])
        times = {name: [] for name in cells}
        for _ in range(repeats):
            for name, cell in cells.items():
                times[name] += time_block(cell, staged)[0]
        ratios.append(float(np.median(times["tensor_sum"]) / np.median(times["baseline"])))
    return ratios


def main(device_name: str, workload_name: str) -> int:
    """Print the table of checks; exit status 0 when every goal is met, 1 when any is missed."""
    device = torch.device(device_name)
    workload = resolve_workload(workload_name)
    staged = stage_batches(workload, "train", 40, device)
    goals = GOALS[device.type]
    print(f"loopmark selfcheck on {device_name}, workload {workload_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    marks, loop = overhead(workload, device, staged)
    rows.append(("timing-pass overhead: per-step marks vs the same loop timed whole", f"{marks:+.2%}",
                 f"<= {goals['overhead']:.0%}", marks <= goals["overhead"]))
    rows.append(("canonical loop vs the seed's loop written out by hand", f"{loop:+.2%}",
                 f"<= {goals['loop']:.0%}", loop <= goals["loop"]))
    mine, theirs, diff = agreement(workload, device, staged)
    rows.append((f"median step: loopmark {mine * 1e6:.1f} us vs torch.utils.benchmark {theirs * 1e6:.1f} us",
                 f"{diff:+.2%}", f"within {goals['agreement']:.0%}", abs(diff) <= goals["agreement"]))
    ratios = ratio_spread(workload, device, staged)
    spread = (max(ratios) - min(ratios)) / float(np.mean(ratios))
    rows.append((f"ratio_to_baseline (tensor_sum) over 3 runs: {', '.join(f'{r:.3f}' for r in ratios)}",
                 f"{spread:.2%}", f"<= {goals['spread']:.0%}", spread <= goals["spread"]))
    print(format_table(["check", "value", "goal", "result"],
                       [[name, value, goal, "met" if ok else "MISSED"] for name, value, goal, ok in rows],
                       right=[1, 2]))
    missed = [name for name, _, _, ok in rows if not ok]
    if missed:
        print(f"{len(missed)} of {len(rows)} goals missed")
        return 1
    return 0
