"""What `loopmark trace` adds to a script's own time per step, on this machine.

    python -m bench.trace_overhead [--steps N] [--warmup W] [--threads T] [--repeats R] [SCRIPT.py ARGS...]
    python -m bench.trace_overhead loops/examples/train_mlp.py --width 512 --batch-size 64     # a ~5 ms step

The script (default: loops/examples/train_mlp.py, an MLP whose step takes about a millisecond; its `--width` and
`--batch-size` make it longer) runs in this process once plainly, unmeasured (the first run in a process pays for
torch's lazy initialisation), then `R` times each way, alternating:

* **plain**: as `python SCRIPT.py ARGS` runs it on this machine (no GPU shown, no mode, no patch), with one optimizer
  step hook that takes a timestamp and stops the script after the same number of steps a trace runs
  (W + 4 N). Its own time per step is the median step time after the first W steps.
* **traced**: `bench.trace.trace`, as `loopmark trace --steps N --warmup W` runs it. The wall time of each of its
  passes (count, audit, time, memory: from its start to the next one's; the memory pass to the end of the trace, its
  figures made) divided by its steps, and of the whole trace (setup included) divided by all its steps.

Each figure is given as wall time and as this process's CPU time (`time.process_time`; the plain run's over its
steps after the first W), the steadier of the two on a loaded machine.

Printed: each figure in milliseconds per step and as a ratio to the plain time per step (the goals: the time pass's
median step as recorded at most 1.1x, each pass at most 3x per step, the whole trace at most 3x), with the load
average (the figures of a loaded machine swing). A traced script is shown a GPU, so it may take other branches than
the plain run (the MNIST example moves its batches with one DataLoader worker instead of none): the plain run is the
script as its user runs it here.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench import trace
from bench.target import Target, script_target

DEFAULT_SCRIPT = [str(Path(__file__).resolve().parents[1] / "loops" / "examples" / "train_mlp.py")]
GOAL = 3.0


def _clocks() -> tuple[float, float]:
    """(wall, CPU time of this process) in seconds: on a loaded machine the CPU time is the steadier figure."""
    return time.perf_counter(), time.process_time()


def plain(target: Target, total: int, warmup: int) -> tuple[list[float], float, float]:
    """Per-step wall seconds, the whole wall time of `total` steps of the script run as it is, and its CPU seconds per
    step after the first `warmup` steps."""
    marks = [_clocks()]

    def hook(optimizer, args, kwargs):
        marks.append(_clocks())
        if len(marks) > total:
            raise trace._Stop

    handle = register_optimizer_step_post_hook(hook)
    try:
        outcome = trace.run_target(target)
    finally:
        handle.remove()
    if outcome.how != "stopped":
        raise SystemExit(f"the script did not run {total} steps ({outcome.how} {outcome.detail})")
    cpu = (marks[-1][1] - marks[warmup][1]) / (total - warmup)
    return [b[0] - a[0] for a, b in itertools.pairwise(marks[1:])], marks[-1][0] - marks[0][0], cpu


PASSES = (("count", "counting"), ("audit", "auditing"), ("time", "timing"), ("memory", "measuring memory"))


def traced(target: Target, steps: int, warmup: int) -> dict:
    """Wall and CPU seconds per step of each pass ({pass: (wall, cpu)}; the last runs to the end of the trace, its
    figures made) and of the whole trace."""
    begun: dict[str, tuple[float, float]] = {}

    def say(text: str) -> None:
        for phase, word in PASSES:
            if word in text:
                begun[phase] = _clocks()

    start = _clocks()
    result = trace.trace(target, steps, warmup, say=say)
    end = _clocks()
    if result.record.get("trace_passes") != dict.fromkeys(trace.PHASES, steps):
        raise SystemExit(f"the trace did not finish its passes: {result.record.get('trace_passes')}")
    ends = [begun[p] for p, _ in PASSES[1:]] + [end]
    out = {p: ((b[0] - a[0]) / steps, (b[1] - a[1]) / steps) for (p, _), a, b in zip(PASSES, [begun[p] for p, _ in
                                                                                          PASSES], ends)}
    total = warmup + len(trace.PHASES) * steps
    out.update({"time pass median": result.record["step_time_median_s"], "wall": end[0] - start[0],
                "whole": ((end[0] - start[0]) / total, (end[1] - start[1]) / total),
                "syncs_per_step": result.record["syncs_per_step"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=trace.DEFAULT_STEPS)
    parser.add_argument("--warmup", type=int, default=trace.DEFAULT_WARMUP)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier figures)")
    parser.add_argument("--repeats", type=int, default=2, help="runs each way, alternating (default 2)")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="SCRIPT.py ARGS (default: the MLP example)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = args.script or DEFAULT_SCRIPT
    target = script_target(command[0], command[1:])
    total = args.warmup + len(trace.PHASES) * args.steps
    print(f"{target.command}: {total} steps each way ({args.warmup} warm-up + {len(trace.PHASES)} x {args.steps}), "
          f"{args.repeats} runs each way, {args.threads} thread(s), torch {torch.__version__}", file=sys.stderr)
    plain(target, total, args.warmup)  # unmeasured: torch's first run in a process is slower
    own, own_cpu, plain_walls, runs = [], [], [], []
    for _ in range(args.repeats):
        times, wall, cpu = plain(target, total, args.warmup)
        own += times[args.warmup:]
        own_cpu.append(cpu)
        plain_walls.append(wall)
        runs.append(traced(target, args.steps, args.warmup))
    per_step, per_step_cpu = statistics.median(own), statistics.median(own_cpu)

    def both(key):
        return statistics.median(r[key][0] for r in runs), statistics.median(r[key][1] for r in runs)
    rows = [("plain: the script's own step (wall: median)", (per_step, per_step_cpu)),
            ("traced: count pass (syncs, operators), per step", both("count")),
            ("traced: audit pass, per step", both("audit")),
            ("traced: time pass, per step", both("time")),
            ("traced: time pass, median step as recorded", (statistics.median(r["time pass median"] for r in runs),
                                                            None)),
            ("traced: memory pass (profiler; figures made), per step", both("memory")),
            ("traced: whole trace, setup included, per step", both("whole"))]
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  wall ms/step  x plain   CPU ms/step  x plain")
    for name, (wall, cpu) in rows:
        shown = f"  {cpu * 1e3:11.2f}  {cpu / per_step_cpu:6.2f}x" if cpu is not None else ""
        print(f"{name:{width}}  {wall * 1e3:12.2f}  {wall / per_step:6.2f}x{shown}")
    whole = statistics.median(r["wall"] for r in runs) / statistics.median(plain_walls)
    print(f"whole trace / plain run of the same {total} steps (wall, setup included): {whole:.2f}x "
          f"(goal: at most {GOAL:g}x)")
    print(f"syncs per step counted: {runs[0]['syncs_per_step']:g}")
    if hasattr(os, "getloadavg"):
        print("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0 if whole <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
