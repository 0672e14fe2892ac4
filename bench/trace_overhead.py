"""What `loopmark trace` adds to a script's own time per step, on this machine.

    python -m bench.trace_overhead [--steps N] [--warmup W] [--threads T] [--repeats R] [SCRIPT.py ARGS...]
    python -m bench.trace_overhead loops/examples/train_mlp.py --width 512 --batch-size 64     # a ~5 ms step

The script (default: loops/examples/train_mlp.py, an MLP whose step takes about half a millisecond; its `--width` and
`--batch-size` make it longer) runs in this process once plainly, unmeasured (the first run in a process pays for
torch's lazy initialisation), then `R` times each way, alternating:

* **plain**: as `python SCRIPT.py ARGS` runs it on this machine (no GPU shown, no mode, no patch), with one optimizer
  step hook that takes a timestamp and stops the script after the same number of steps a trace runs
  (W + 3 N). Its own time per step is the median step time after the first W steps.
* **traced**: `bench.trace.trace`, as `loopmark trace --steps N --warmup W` runs it. The wall time of each of its
  passes (count, time, memory) divided by its steps, and of the whole trace (setup included) divided by all its steps.

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

DEFAULT_SCRIPT = [str(Path(__file__).resolve().parents[1] / "loops" / "examples" / "train_mlp.py")]
GOAL = 3.0


def plain(target: trace.Target, total: int) -> tuple[list[float], float]:
    """Per-step seconds and the whole wall time of `total` steps of the script run as it is."""
    marks = [time.perf_counter()]

    def hook(optimizer, args, kwargs):
        marks.append(time.perf_counter())
        if len(marks) > total:
            raise trace._Stop

    handle = register_optimizer_step_post_hook(hook)
    try:
        outcome = trace.run_target(target)
    finally:
        handle.remove()
    if outcome.how != "stopped":
        raise SystemExit(f"the script did not run {total} steps ({outcome.how} {outcome.detail})")
    return [b - a for a, b in itertools.pairwise(marks[1:])], marks[-1] - marks[0]


def traced(target: trace.Target, steps: int, warmup: int) -> dict:
    """Seconds per step of each pass and of the whole trace."""
    begun: dict[str, float] = {}

    def say(text: str) -> None:
        for phase, word in (("count", "counting"), ("time", "timing"), ("memory", "measuring memory")):
            if word in text:
                begun[phase] = time.perf_counter()

    start = time.perf_counter()
    result = trace.trace(target, steps, warmup, say=say)
    end = time.perf_counter()
    if result.record.get("trace_passes") != dict.fromkeys(trace.PHASES, steps):
        raise SystemExit(f"the trace did not finish its passes: {result.record.get('trace_passes')}")
    return {"count": (begun["time"] - begun["count"]) / steps, "time": (begun["memory"] - begun["time"]) / steps,
            "memory": (end - begun["memory"]) / steps, "time pass median": result.record["step_time_median_s"],
            "whole": (end - start) / (warmup + len(trace.PHASES) * steps), "wall": end - start,
            "syncs_per_step": result.record["syncs_per_step"]}


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
    target = trace.script_target(command[0], command[1:])
    total = args.warmup + len(trace.PHASES) * args.steps
    print(f"{target.command}: {total} steps each way ({args.warmup} warm-up + 3 x {args.steps}), "
          f"{args.repeats} runs each way, {args.threads} thread(s), torch {torch.__version__}", file=sys.stderr)
    plain(target, total)  # unmeasured: torch's first run in a process is slower
    own, plain_walls, runs = [], [], []
    for _ in range(args.repeats):
        times, wall = plain(target, total)
        own += times[args.warmup:]
        plain_walls.append(wall)
        runs.append(traced(target, args.steps, args.warmup))
    per_step = statistics.median(own)
    plain_wall = statistics.median(plain_walls)
    rows = [("plain: the script's own step (median)", per_step),
            ("traced: count pass (syncs, operators), per step", statistics.median(r["count"] for r in runs)),
            ("traced: time pass, per step", statistics.median(r["time"] for r in runs)),
            ("traced: time pass, median step as recorded", statistics.median(r["time pass median"] for r in runs)),
            ("traced: memory pass (profiler), per step", statistics.median(r["memory"] for r in runs)),
            ("traced: whole trace, setup included, per step", statistics.median(r["whole"] for r in runs))]
    width = max(len(name) for name, _ in rows)
    print(f"{'':{width}}  ms/step  x plain")
    for name, seconds in rows:
        print(f"{name:{width}}  {seconds * 1e3:7.2f}  {seconds / per_step:6.2f}x")
    whole = statistics.median(r["wall"] for r in runs) / plain_wall
    print(f"whole trace / plain run of the same {total} steps (wall, setup included): {whole:.2f}x "
          f"(goal: at most {GOAL:g}x)")
    print(f"syncs per step counted: {runs[0]['syncs_per_step']:g}")
    if hasattr(os, "getloadavg"):
        print("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0 if whole <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
