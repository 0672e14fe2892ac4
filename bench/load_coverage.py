"""Do the report's time intervals stay honest under load? `python -m bench.load_coverage`

Times a quick set of cells (`loopmark run`'s own timing pass, `Runner._time`: interleaved blocks, the load read
around each) on a machine left as it is ("quiet"), again quiet, then `--rounds` times with `--hogs` busy-loop
processes beside it. Each cell's ratio to its baseline, its 95 % interval and its `reliability` come from
`reports.results.derive`, as in the report. A loaded cell passes when its interval covers the ratio measured quiet,
or when it is flagged `unreliable`; the goal (issue 13) is 95 % of loaded cells passing with two busy processes on a
2-core machine. The second quiet run shows what the intervals are worth without load.

The machine may be loaded already (other users): each phase prints the load it saw — timed blocks disturbed, the
time the process's threads waited for a CPU, other runnable processes, the load average — and the quiet reference's
own unreliable cells are named: a ratio measured on a busy "quiet" machine is a poor reference.

Only the timing pass runs (no correctness, sync or memory pass): a few seconds per phase for `mlp`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.cell import stage_batches
from bench.runner import QUICK, Runner, cell_spec, plan, replace_settings
from loops import resolve_variant, resolve_workload
from reports import results, stats
from reports.results import Measurement

GOAL = 0.95
BUSY_LOOP = "while True:\n    pass\n"


class _Timer(Runner):
    """`loopmark run`'s timing pass, keeping the records in memory (nothing written but its lock)."""

    def save(self, spec, m) -> None:
        self.records[spec.key] = results.record(spec, m, self.s.seed)


def time_cells(workloads, variants, settings, out: Path) -> list[dict]:
    """Records (derived: ratio, CI, reliability) of one timing pass over the planned cells on CPU."""
    timer = _Timer(out, settings, progress=lambda r: None, status=lambda t: None)
    try:
        device = torch.device("cpu")
        for g in plan(["cpu"], workloads, variants):
            workload = resolve_workload(g.workload)
            chosen = [resolve_variant(v) for v in g.variants]
            chosen = [v for v in chosen if v.requires != "cuda"]
            kind = chosen[0].kind
            staged = stage_batches(workload, "test" if kind == "eval" else "train", settings.steps, device)
            pending = {v.name: (cell_spec(workload, v, device, settings), Measurement()) for v in chosen}
            timer._time(workload, device, chosen, staged, pending)
    finally:
        timer.close()
    return results.derive(list(timer.records.values()))


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:  # only the processes this script started, by their own handles
        h.kill()
    for h in hogs:
        h.wait()


def load_seen(records: list[dict]) -> dict:
    """What the timed blocks saw: blocks disturbed, run-queue wait and other runnable processes (median, most)."""
    blocks = [(b, r["device"]) for r in records for b in (r.get("block_load") or []) if isinstance(b, dict)]
    waits = [w for w in (stats.wait_fraction(b) for b, _ in blocks) if w is not None]
    others = [n for n in (stats.max_others(b) for b, _ in blocks) if n is not None]
    return {"blocks": len(blocks), "disturbed": sum(1 for b, d in blocks if stats.block_interference(b, d)),
            "wait_median": float(np.median(waits)) if waits else None, "wait_max": max(waits) if waits else None,
            "others_median": float(np.median(others)) if others else None,
            "others_max": max(others) if others else None}


def coverage(reference: list[dict], run: list[dict]) -> dict:
    """Per non-baseline cell timed in both: covered (the run's interval holds the reference's ratio), flagged
    (the run's cell is unreliable), passed (either)."""
    truth = {results.cell_key(r): r for r in reference}
    rows = []
    for r in run:
        ref = truth.get(results.cell_key(r))
        if r["variant"] == r.get("baseline_variant") or ref is None:
            continue
        if not (_real(r.get("ratio_to_baseline")) and _real(ref.get("ratio_to_baseline"))):
            continue
        flagged = str(r.get("reliability") or "").startswith("unreliable")
        low, high = r.get("ratio_ci_low"), r.get("ratio_ci_high")
        covered = _real(low) and _real(high) and low <= ref["ratio_to_baseline"] <= high
        rows.append({"cell": "/".join(results.cell_key(r)), "flagged": flagged, "covered": bool(covered),
                     "ratio": r["ratio_to_baseline"], "low": low, "high": high, "truth": ref["ratio_to_baseline"],
                     "reference_unreliable": str(ref.get("reliability") or "").startswith("unreliable")})
    n = len(rows)
    passed = sum(1 for x in rows if x["covered"] or x["flagged"])
    unflagged = [x for x in rows if not x["flagged"]]
    return {"cells": n, "flagged": sum(x["flagged"] for x in rows), "passed": passed,
            "covered": sum(x["covered"] for x in rows),
            "fraction": passed / n if n else float("nan"),
            "covered_unflagged": sum(x["covered"] for x in unflagged), "unflagged": len(unflagged), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", action="append", help="workloads (default: mlp)")
    parser.add_argument("--variant", action="append", help="variants (default: the seed's training variants)")
    parser.add_argument("--hogs", type=int, default=2, help="busy-loop processes beside the loaded runs (2)")
    parser.add_argument("--rounds", type=int, default=3, help="loaded runs (3)")
    parser.add_argument("--steps", type=int, help=f"timed steps per block ({QUICK.steps}, as --quick)")
    parser.add_argument("--repeats", type=int, help=f"timed blocks per cell ({QUICK.repeats}, as --quick)")
    parser.add_argument("-v", "--verbose", action="store_true", help="every loaded cell that neither covers nor is "
                                                                     "flagged, and the quiet reference's ratios")
    args = parser.parse_args(argv)
    workloads = args.workload or ["mlp"]
    variants = args.variant or _seed_training_variants()
    settings = replace_settings(QUICK, steps=args.steps, repeats=args.repeats)
    print(f"load coverage: {', '.join(workloads)} on cpu, {settings.steps} steps x {settings.repeats} blocks per "
          f"cell, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores; {args.hogs} busy processes beside "
          f"{args.rounds} loaded run(s); load average at the start {_loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="loopmark-load-") as scratch:
        phases = [("quiet reference", 0), ("quiet again", 0)] + [(f"loaded {i + 1} ({args.hogs} hogs)", args.hogs)
                                                                 for i in range(args.rounds)]
        runs = []
        for i, (name, hogs) in enumerate(phases):
            started = start_hogs(hogs)
            try:
                if started:
                    time.sleep(0.5)  # the busy loops running before the first block
                t0 = time.monotonic()
                records = time_cells(workloads, variants, settings, Path(scratch) / str(i))
                took = time.monotonic() - t0
            finally:
                stop_hogs(started)
            runs.append((name, hogs, records, took, _loadavg()))
    reference = runs[0][2]
    print(f"\n{'phase':<22} {'cells':>5} {'flagged':>8} {'covered (all)':>14} {'covered (unflagged)':>20} "
          f"{'covered or flagged':>19}   load seen: blocks disturbed; CPU wait of the threads median/max; other "
          "runnable median/max; loadavg")
    loaded_total = loaded_passed = 0
    for name, hogs, records, _took, loadavg in runs:
        seen = load_seen(records)
        load = (f"{seen['disturbed']}/{seen['blocks']}; {_pct(seen['wait_median'])}/{_pct(seen['wait_max'])}; "
                f"{_num(seen['others_median'])}/{_num(seen['others_max'])}; {loadavg}")
        if records is reference:
            unreliable = sum(str(r.get("reliability") or "").startswith("unreliable") for r in records)
            print(f"{name:<22} {len(records):>5} {unreliable:>8} {'-':>14} {'-':>20} {'-':>19}   {load}")
            continue
        c = coverage(reference, records)
        if hogs:
            loaded_total += c["cells"]
            loaded_passed += c["passed"]
        print(f"{name:<22} {c['cells']:>5} {c['flagged']:>8} {c['covered']:>8}/{c['cells']:<5} "
              f"{c['covered_unflagged']:>9}/{c['unflagged']:<10} "
              f"{c['passed']:>7}/{c['cells']:<3} {c['fraction']:>6.1%}   {load}")
        if args.verbose:
            for x in c["rows"]:
                if not (x["covered"] or x["flagged"]):
                    print(f"    not covered: {x['cell']} {x['ratio']:.3f} [{_num(x['low'])}, {_num(x['high'])}] "
                          f"vs quiet {x['truth']:.3f}")
    quiet_unreliable = [r for r in reference if str(r.get("reliability") or "").startswith("unreliable")]
    if quiet_unreliable:
        print(f"\nthe quiet reference was not quiet: {len(quiet_unreliable)} of {len(reference)} cells unreliable "
              f"(e.g. {results.cell_key(quiet_unreliable[0])[1]}: {quiet_unreliable[0]['reliability']})")
    if args.verbose:
        print("\nquiet reference ratios: " + ", ".join(
            f"{r['variant']} {r['ratio_to_baseline']:.3f}" for r in reference if _real(r.get("ratio_to_baseline"))))
    if not loaded_total:
        print("\nno loaded cell to judge")
        return 1
    fraction = loaded_passed / loaded_total
    print(f"\nunder load: {loaded_passed} of {loaded_total} cells covered the quiet ratio or were flagged unreliable: "
          f"{fraction:.1%} (goal {GOAL:.0%}: {'met' if fraction >= GOAL else 'NOT met'})")
    return 0 if fraction >= GOAL else 1


def _seed_training_variants() -> list[str]:
    from loops import builtin_names

    return list(builtin_names("train", False))


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:4])
    except OSError:
        return "unknown"


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _pct(v) -> str:
    return f"{v:.0%}" if _real(v) else "-"


def _num(v) -> str:
    return f"{v:.3g}" if _real(v) else "-"


if __name__ == "__main__":
    sys.exit(main())
