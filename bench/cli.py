"""The `loopmark` command line: one argparse tree with a subcommand each for list, check, run, selfcheck,
report, compare, merge and trace.

Exit status: 0 success, 1 a failed check, a regression or (`run --strict`) a failed cell, 2 bad input (one line, no
traceback), 3 results or a report could not be written (a full disk; the cells saved before are kept), 130
interrupted. `loopmark` alone lists the commands, one line each, and exits 2 (a command line with no command).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import threading
from pathlib import Path

import bench
from bench import launcher

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_WRITE = 3  # an output could not be written mid-way (a full disk): one line, what was saved before is kept
RESULTS_ROOT = Path("results")  # `loopmark run` without --out: a new directory here per run, `latest` the newest


class UsageError(Exception):
    """Bad input: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`loopmark run: argument --steps: ...`) and exit 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _devices(name: str, valid: str) -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise UsageError(f"--device cuda: no CUDA GPU is visible to torch here; valid: {valid}")
    if name == "all":
        return ["cuda", "cpu"] if cuda else ["cpu"]
    return [name]


def _resolve_names(workloads, variants):
    """Fail early, with one line, on any name that does not resolve."""
    from loops import BadName, resolve_variant, resolve_workload

    try:
        for w in workloads or []:
            try:
                resolve_workload(w)
            except BadName:
                raise
            except (Exception, SystemExit):  # the workload's own code raised: a fault of its cells, kept as they run
                pass
        for v in variants or []:
            resolve_variant(v)
    except BadName as exc:
        raise UsageError(str(exc)) from None


def _check_builtin_names(args) -> None:
    """Fail at once, with one line, on a built-in name that is not one: `loops.registry` is read without torch, which
    takes seconds to import. A user's package.module:function is resolved when the command runs."""
    from loops import BadName
    from loops.registry import check_variant_name, check_workload_name

    workloads = getattr(args, "workload", None)
    try:
        for name in [workloads] if isinstance(workloads, str) else workloads or []:  # selfcheck takes one
            check_workload_name(name)
        for name in getattr(args, "variant", None) or []:
            check_variant_name(name)
    except BadName as exc:
        raise UsageError(str(exc)) from None


def cmd_list(args) -> int:
    from loops import BUILTINS, WORKLOADS, resolve_variant, resolve_workload
    from reports.table import format_table

    rows = []
    for name in BUILTINS:
        v = resolve_variant(name)
        expected = ", ".join(f"{k}: {x}" if k != "*" else x for k, x in v.expected.items())
        rows.append([name, v.kind, v.idiom, expected, v.description])
    print(format_table(["variant", "kind", "idiom", "expected verdict", "description"], rows))
    print("\ncompose variants with '+', e.g. tensor_sum+set_to_none_false; your own: package.module:function\n")
    rows = [[name, w.batch_size, w.description] for name, w in ((n, resolve_workload(n)) for n in WORKLOADS)]
    print(format_table(["workload", "batch", "description"], rows, right=[1]))
    return EXIT_OK


def cmd_check(args) -> int:
    import torch

    from bench import runner
    from loops import WORKLOADS, builtin_names, resolve_variant
    from reports.table import format_table

    _resolve_names(args.workload, args.variant)
    spread = _distributed_plan(args)
    if spread and not launcher.launched():  # the ranks run this command under torchrun
        return launcher.launch_check(_child_args(args, "check"), args.nproc_per_node, args.device, args.cell_timeout)
    if spread:
        spread.init(args.device)
    device = spread.rank_device(args.device) if spread else torch.device(_devices(args.device, "cpu")[0])
    rank = spread.world()[0] if spread else 0
    kinds = ("ddp",) if spread else ("train", "eval")
    names = args.variant or [n for n in builtin_names() if resolve_variant(n).kind in kinds]
    default_workloads = runner.DEFAULT_DDP_WORKLOADS if spread else list(WORKLOADS)
    cells = [(wname, vname) for wname in args.workload or default_workloads for vname in names]
    checked = _check_cells(cells, device, args, spread)
    rows, failures = [], 0
    for n, (row, bad) in enumerate(checked, 1):
        _status(f"checked {n}/{len(cells)}: {row[0]} {row[1]}")
        rows.append(row)
        failures += bad
    _status("")
    if spread:
        spread.finish()
    if rank:  # rank 0 reports for every rank
        return EXIT_FAIL if failures else EXIT_OK
    print(format_table(["workload", "variant", "verdict", "expected", "reason"], rows))
    print(f"\n{failures} failing cell(s)" if failures else "\nall verdicts as expected")
    return EXIT_FAIL if failures else EXIT_OK


def _check_cells(cells: list[tuple[str, str]], device, args, spread):
    """(row, failed) of each (workload, variant) cell, in order. On the CPU in one process of a single thread, the
    cells are shared out among processes forked from this one (`--jobs`, one per core up to 4 by default, each of
    one core's threads): a verdict is made within one process (the baseline it is judged against is that process's
    own), and on a small machine one thread per cell does more than two on one cell."""
    from concurrent.futures.process import BrokenProcessPool
    from functools import partial

    from loops import resolve_variant

    check = partial(_check_cell, device=device, epochs=args.epochs, steps=args.steps, seed=args.seed)
    cores = os.cpu_count() or 1
    jobs = min(args.jobs or min(cores, 4), len(cells))
    done = 0
    _CHECK_CACHE.clear()  # this check's own: a worker forked from here starts with it empty
    try:
        if jobs > 1 and not spread and device.type == "cpu" and launcher.fork_safe():
            try:
                # compiling cells take seconds more than the others: they go first
                compiling = {name for name in {v for _, v in cells} if resolve_variant(name).idiom == "compilation"}
                for result in launcher.forked_map(check, cells, jobs, max(1, cores // jobs),
                                                  first=lambda cell: cell[1] in compiling):
                    done += 1
                    yield result
            except BrokenProcessPool:  # a loop that ended its process: the cells from there on run here
                pass
        for cell in cells[done:]:
            yield check(cell, spread=spread)
    finally:
        _CHECK_CACHE.clear()  # the baselines' parameters and gradients are not kept past the check


# the workloads and baselines of the check under way in this process, by workload name: shared by that workload's
# cells (a module's, not an argument's: a forked worker gets it at the fork, and keeps it from cell to cell)
_CHECK_CACHE: dict = {}


def _check_cell(cell: tuple[str, str], device, epochs, steps, seed, spread=None) -> tuple[list[str], bool]:
    """The check of one (workload, variant) cell: its table row and whether it fails."""
    from bench import correctness, runner
    from loops import resolve_variant, resolve_workload
    from reports.results import as_expected

    wname, vname = cell
    variant = resolve_variant(vname)
    if wname not in _CHECK_CACHE:
        try:
            _CHECK_CACHE[wname] = resolve_workload(wname), {}
        except runner.CELL_FAULTS as exc:  # the user's workload function raised: a fault of each of its cells
            _CHECK_CACHE[wname] = exc, None
    workload, cache = _CHECK_CACHE[wname]
    if cache is None:
        return [wname, variant.name, "error", variant.expected_for(wname),
                runner.fault_text(workload) + "  <-- FAIL"], True
    if spread:  # the launcher ends every rank when a cell makes no progress within --cell-timeout
        spread.heartbeat((workload.name, variant.name, str(device)), "correctness")
    try:
        r = correctness.check(workload, variant, device, epochs or correctness.CHECK_EPOCHS, steps, seed, cache)
    except runner.CELL_FAULTS as exc:  # a user's loop that raises or exits
        if spread:  # the other ranks wait for this one in a collective: end them all, saying why
            print(f"loopmark check: rank {spread.world()[0]}: {workload.name} {variant.name}: error: "
                  f"{runner.fault_text(exc)}", file=sys.stderr, flush=True)
            os._exit(EXIT_FAIL)
        r = {"verdict": "error", "expected_verdict": variant.expected_for(workload.name),
             "verdict_reason": runner.fault_text(exc)}
    expected = r["expected_verdict"]
    matches = as_expected("skipped" if r["verdict"] == "skipped" else "ok", r["verdict"], expected)
    bad = matches is False or (matches is None and r["verdict"] in ("broken", "error"))
    reason = r["verdict_reason"] + ("  <-- FAIL" if bad else "")
    return [workload.name, variant.name, r["verdict"], expected, reason], bad


def _status(text: str) -> None:
    """A transient status line on a terminal (nothing in a log)."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    from bench import runner
    from reports.results import OutputError

    _resolve_names(args.workload, args.variant)
    spread = _distributed_plan(args)
    devices = _devices(args.device, "cpu, all")
    settings = runner.QUICK if args.quick else runner.Settings()
    settings = runner.replace_settings(settings, steps=args.steps, repeats=args.repeats, seed=args.seed,
                                       warmup=args.warmup, cell_timeout=args.cell_timeout)
    if settings.steps < 3:
        raise UsageError("--steps must be >= 3")
    if spread and launcher.launched():  # one rank of a distributed run: one device, the process group's
        devices = devices[:1]
    groups = runner.plan(devices, args.workload, args.variant, args.extended, distributed=bool(spread))
    if args.shard:  # this job's part of the plan; `loopmark merge` puts the shards' results together
        try:
            groups = runner.shard(groups, *args.shard)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if spread and not launcher.launched():
        return _launch_run(args, groups, devices, settings)
    if spread:
        spread.init(devices[0], settings.cell_timeout or None)
        if spread.world()[0]:  # a rank other than 0: measures, and writes nothing
            run = runner.DistributedRunner(Path(args.out or "."), settings, progress=lambda r: None,
                                           status=lambda t: None)
            run.run(groups)
            spread.finish()
            return EXIT_OK
    out = _out_dir(args)
    printer = _Progress(groups)
    try:
        make = runner.DistributedRunner if spread else runner.Runner
        run = make(out, settings, resume=args.resume, progress=printer, status=printer.status)
    except ValueError as exc:  # --resume on results it cannot finish, or another run writing to --out
        printer.close()
        raise UsageError(str(exc)) from None
    run.env["devices"] = devices  # `loopmark merge` puts together only runs planned for the same devices
    if args.shard:
        run.env["shard"] = "{}/{}".format(*args.shard)
    try:
        records = run.run(groups)
    except KeyboardInterrupt:
        printer.close()
        kept = (f"{len(run.records)} finished cell(s) kept in {out}/results.csv and results.json" if run.records
                else f"no cell had finished, so nothing was written to {out}/results.csv or results.json")
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        if run.untimed.cells:
            print(f"the untimed passes of {len(run.untimed.cells)} unfinished cell(s) are kept in "
                  f"{out}/{runner.UNTIMED_FILE}: --resume times them without running those passes again",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except OutputError as exc:  # a full disk: every cell saved before stays in results.json
        printer.close()
        print(f"\nloopmark run: {exc}; the cells saved before it are kept in {out}/results.json", file=sys.stderr)
        return EXIT_WRITE
    printer.close()
    if spread:
        spread.finish()
    if spread and os.environ.get(launcher.HEARTBEAT_ENV):  # rank 0 under `run --nproc-per-node`: its launcher reports
        return EXIT_OK
    return _finish(args, out, records)


def _finish(args, out: Path, records: list[dict]) -> int:
    """The end of a run: the summary, the report (unless --no-report), and with --strict the failing cells."""
    _summary(records)
    if args.no_report:  # a report there before is not these results'
        from reports.results import remove_report

        remove_report(out)
    reported = args.no_report or _report([out])
    print(f"\nwrote {out}/results.csv, {out}/results.json")
    failed = strict_failures(records) if args.strict else []
    if failed:
        from reports.table import printable

        print(f"\nloopmark run --strict: {len(failed)} failing cell(s):", *map(printable, failed), sep="\n  ",
              file=sys.stderr)
    return EXIT_WRITE if not reported else EXIT_FAIL if failed else EXIT_OK


def _distributed_plan(args):
    """`bench.distributed` when this command runs distributed cells (`--nproc-per-node N`, or torchrun started this
    process), else None; a distributed variant asked for without either is bad input."""
    from bench import distributed
    from loops import resolve_variant

    nproc = getattr(args, "nproc_per_node", None)
    if nproc:
        _check_nproc(nproc)
    if nproc or launcher.launched():
        if args.device == "cuda" or (args.device == "all" and _devices("all", "")[0] == "cuda"):
            args.device = "cuda"
        else:
            args.device = "cpu"
        others = [v for v in args.variant or [] if resolve_variant(v).kind != "ddp"]
        if others:
            raise UsageError(f"--nproc-per-node runs the distributed variants (ddp_*, or ddp_baseline+IDIOM); "
                             f"{others[0]!r} runs in one process: run it without --nproc-per-node")
        return distributed
    ddp = [v for v in args.variant or [] if resolve_variant(v).kind == "ddp"]
    if ddp:
        raise UsageError(f"{ddp[0]!r} runs one process per rank: add --nproc-per-node N (2 on one machine)")
    return None


MAX_RANKS_PER_CORE = 4  # more processes than this per core: refused (each rank is a whole torch process)


def _check_nproc(nproc: int) -> None:
    """`--nproc-per-node N` on this machine's cores: a warning above one rank per core (the ranks share the cores, and
    their step times say so), refused above MAX_RANKS_PER_CORE per core: 64 ranks on 2 cores took 13 GB and gave
    timings of nothing but their contention."""
    from bench.timing import usable_cores

    cores = usable_cores() or 1
    if nproc > MAX_RANKS_PER_CORE * cores:
        raise UsageError(f"--nproc-per-node {nproc}: more than {MAX_RANKS_PER_CORE} processes per core ({cores} "
                         f"core{'s' if cores != 1 else ''} here); each rank is a whole torch process: use at most "
                         f"{MAX_RANKS_PER_CORE * cores}")
    if nproc > cores:
        print(f"loopmark: warning: --nproc-per-node {nproc} on {cores} core{'s' if cores != 1 else ''}: the ranks "
              "share the cores, so their step times measure that contention too", file=sys.stderr, flush=True)


def _child_args(args, command: str) -> list[str]:
    """The options a rank is started with: the user's, less what the launcher decides (device, output)."""
    out = []
    for name in ("workload", "variant"):
        for value in getattr(args, name) or []:
            out += [f"--{name}", value]
    flags = {"run": ("quick", "extended", "strict"), "check": ()}[command]
    out += [f"--{f}" for f in flags if getattr(args, f, False)]
    for name in ("steps", "repeats", "warmup", "seed", "cell_timeout", "epochs"):
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    if getattr(args, "shard", None):
        out += ["--shard", "{}/{}".format(*args.shard)]
    if command == "check":
        out = ["--device", args.device, *out]
    return out


def _launch_run(args, groups, devices, settings) -> int:
    """`loopmark run --nproc-per-node N`: the cells run under torchrun, one process per rank (rank 0 writes them to
    --out); a cell whose ranks crash, hang or fault is recorded here, and the ranks go on with the cells after it."""
    from bench import runner
    from bench.cell import parse_device
    from loops import resolve_variant, resolve_workload
    from reports import results
    from reports.results import Measurement

    out = _out_dir(args)
    planned = {(g.workload, v, g.device): None for g in groups for v in g.variants}  # in plan order
    printer = _Progress(groups)

    def record_fault(cell, status: str, message: str) -> None:
        try:
            run = runner.Runner(out, settings, resume=True, progress=printer, status=printer.status)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            if (out / "results.json").exists():
                run.env.update(results.read_results(out)[0])
            # a rank that failed after its cell was saved (as it left) does not undo the cell
            cells = [c for c in ([cell] if cell else planned) if not run.finished(*c)]
            for workload, variant, device in cells:
                try:
                    made = resolve_workload(workload)
                except runner.CELL_FAULTS:
                    made = workload
                spec = runner.cell_spec(made, resolve_variant(variant), parse_device(device), settings,
                                        ranks=args.nproc_per_node)
                m = Measurement()
                m.fault(status, message)
                run.save(spec, m)
        finally:
            run.close()

    # the ranks finish what --out holds (--resume): the results --overwrite replaces are set aside, and put back if
    # the run ends before its first cell is saved (as in one process, where they stay until then)
    aside = results.set_aside(out) if args.overwrite else None
    try:
        for device in devices:
            launcher.launch_run(_child_args(args, "run"), out, args.nproc_per_node, device, settings.cell_timeout,
                               record_fault, lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        printer.close()
        kept = (f"the finished cells are kept in {out}/results.json" if (out / "results.json").exists() else
                f"no cell had finished, so nothing was written to {out}/results.csv or results.json"
                + (" (the results there before are kept)" if aside is not None and aside.held else ""))
        print(f"\ninterrupted: {kept} (a distributed run keeps no unfinished cell's passes: --resume runs them "
              "again)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if aside is not None:
            aside.settle()
    printer.close()
    if not (out / "results.json").exists():
        print(f"loopmark run: no cell was recorded in {out}", file=sys.stderr)
        return EXIT_FAIL
    order = {cell: i for i, cell in enumerate(planned)}  # a faulted cell, recorded here first, shown in its place
    records = sorted(results.read_results(out)[1], key=lambda r: order.get(results.cell_key(r), len(order)))
    return _finish(args, out, records)


def strict_failures(records: list[dict]) -> list[str]:
    """What makes `run --strict` fail, one line per cell: a fault (error, timeout, diverged, oom), a built-in's verdict
    other than the one it declares, or a variant of yours that is broken (as `check` judges)."""
    from bench.runner import short
    from reports.results import FAULTS

    failed = []
    for r in records:
        where = f"{r['device']} {r['workload']} {r['variant']}"
        if r.get("status") in FAULTS:
            failed.append(f"{where}: {r['status']}" + (f": {short(r['error'])}" if r.get("error") else ""))
        elif r.get("status") == "ok" and (r.get("verdict_as_expected") is False or (
                r.get("verdict_as_expected") is None and r.get("verdict") == "broken")):
            expected = r.get("expected_verdict")
            failed.append(f"{where}: verdict {r.get('verdict')}" + (f", expected {expected}" if expected else ""))
    return failed


def _out_dir(args) -> Path:
    """Where this run's results go, checked writable before anything is measured. Without --out: a new directory
    results/<UTC time> with results/latest pointing at it (with --resume: the run results/latest points at). An
    --out holding an earlier run's results is refused unless --resume or --overwrite says what to do with them."""
    from reports import results

    if args.resume and args.overwrite:
        raise UsageError("--resume keeps the cells in --out, --overwrite replaces them: give one")
    try:
        if args.out is None:
            out = (results.latest_run(RESULTS_ROOT) if args.resume else None) or results.new_run_dir(RESULTS_ROOT)
            latest = results.link_latest(RESULTS_ROOT, out)
            print(f"results go to {out}/" + (f" ({latest} points there)" if latest else ""), file=sys.stderr)
            return out
        out = Path(args.out)
        if results.holds_results(out) and not (args.resume or args.overwrite):
            keep = "add --resume to finish it or " if args.command == "run" else "add "
            raise UsageError(f"--out {out}: holds the results of an earlier run; {keep}--overwrite to replace it, or "
                             f"choose another directory")
        return results.check_writable(out)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None


class _Progress:
    """Progress of `loopmark run` on stderr. On a terminal: a tqdm bar over cells whose description says which pass
    or timed block runs ("mlp cpu: timing block 2/5 (about 3 min left)"), and a line for each cell that failed.
    Otherwise (CI logs): a plain line per pass, per round of timed blocks and per finished cell."""

    def __init__(self, groups):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(len(g.variants) for g in groups), unit="cell", file=sys.stderr)

    def __call__(self, record: dict) -> None:
        from bench.runner import progress_line

        if self.bar is None:
            print(progress_line(record), file=sys.stderr, flush=True)
            return
        self.bar.update(1)
        if record.get("status") not in ("ok", "skipped"):
            self.bar.write(progress_line(record), file=sys.stderr)

    def status(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.set_description_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str("", refresh=False)
            self.bar.close()
            self.bar = None


def _summary(records: list[dict]) -> None:
    from bench.runner import short
    from reports.table import format_table

    def fmt(r, key, spec):
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    spread = any(r.get("ranks") for r in records)  # distributed cells: their collectives per step too
    ratios = [r for r in records if _finite(r.get("ratio_to_baseline")) and r["variant"] != r.get("baseline_variant")]
    unreliable = [r for r in ratios if str(r.get("reliability") or "").startswith("unreliable")]
    rows = [[r["device"], r["workload"], r["variant"], fmt(r, "samples_per_s", ",.0f"),
             fmt(r, "ratio_to_baseline", ".3f") + ("?" if any(r is u for u in unreliable) else ""),
             fmt(r, "syncs_per_step", ".2f"),
             *([fmt(r, "collectives_per_step", ".2f")] if spread else []),
             fmt(r, "memory_growth_bytes_per_step", ",.0f"),
             (r.get("verdict") or "-") + ("!" if r.get("verdict_as_expected") is False else ""), r["status"]]
            for r in records]
    print()
    print(format_table(["device", "workload", "variant", "samples/s", "ratio", "syncs",
                        *(["collectives"] if spread else []), "growth B/st", "verdict", "status"], rows,
                       right=[3, 4, 5, 6, 7] if spread else [3, 4, 5, 6]))
    if unreliable:
        print(f"\n?: {len(unreliable)} of {len(ratios)} ratios unreliable: other work on the machine disturbed their "
              "timed blocks or their baseline's (report.md says which and how); rerun on a quiet machine to trust them")
    disagreeing = _disagreeing(records)
    if disagreeing:
        print(f"ratio and samples/s disagree by more than {DISAGREE - 1:.0%} for {len(disagreeing)} cell(s): "
              "samples/s is the batch over the median of all the cell's steps, the ratio the median over rounds of "
              "its step time over its baseline's in the same round; they agree when the machine's speed holds "
              "steady, and the ratio is the one that divides out its changes")
    faults = [f"  {r['device']} {r['workload']} {r['variant']}: {r['status']}: {short(r['error'])}"
              for r in records if r.get("status") != "ok" and r.get("error")]
    if faults:
        from reports.table import printable

        print("\ncells that did not finish ok:", *map(printable, faults), sep="\n")


DISAGREE = 1.1  # the ratio and the samples/s of one cell disagree past this factor: the summary says why they can


def _disagreeing(records: list[dict]) -> list[dict]:
    """The cells whose ratio to their baseline and the baseline's samples/s over theirs differ by more than DISAGREE."""
    base = {(r["workload"], r["device"], r["variant"]): r.get("samples_per_s") for r in records}
    out = []
    for r in records:
        reference = base.get((r["workload"], r["device"], r.get("baseline_variant")))
        sps, ratio = r.get("samples_per_s"), r.get("ratio_to_baseline")
        if all(_finite(v) and v > 0 for v in (reference, sps, ratio)) and \
                max(ratio / (reference / sps), (reference / sps) / ratio) > DISAGREE:
            out.append(r)
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _report(paths) -> bool:
    """The report of the results just written; False, with one line, when it could not be written (the command then
    exits 3: the results are safe on disk, and `loopmark report` makes the report again)."""
    try:
        from reports.report import write_report

        written = write_report(paths)
        print(f"report: {', '.join(str(p) for p in written if str(p).endswith(('.md', '.html')))}")
        return True
    except Exception as exc:
        print(f"report not written ({type(exc).__name__}: {exc}); the results are kept: `loopmark report "
              f"{paths[0]}` writes it", file=sys.stderr)
        return False


def cmd_selfcheck(args) -> int:
    from bench import selfcheck

    device = _devices(args.device, "cpu")[0]
    _resolve_names([args.workload or "mlp"], None)
    return selfcheck.main(device, args.workload or "mlp")


def cmd_report(args) -> int:
    from reports.report import write_report

    try:
        written = write_report([Path(p) for p in args.paths], Path(args.out) if args.out else None)
    except OSError as exc:  # a full disk: each file is whole, old or new (atomic writes)
        print(f"loopmark report: {exc}", file=sys.stderr)
        return EXIT_WRITE
    for p in written:
        print(p)
    return EXIT_OK


def cmd_compare(args) -> int:
    from reports.compare import compare, format_md, format_text
    from reports.load import load

    base_env, base_df = load(args.baseline)
    cand_env, cand_df = load(args.candidate)
    result = compare(base_env, base_df, cand_env, cand_df, max_slowdown_pct=args.max_slowdown,
                     alpha=args.alpha, memory_pct=args.memory_threshold,
                     only_deterministic=args.only_deterministic)
    print(format_md(result) if args.format == "md" else format_text(result), end="")
    return EXIT_FAIL if result.regressions else EXIT_OK


def cmd_merge(args) -> int:
    from reports import results
    from reports.merge import write_merged

    out = Path(args.out)
    if any(Path(p).resolve() in (out.resolve(), (out / "results.json").resolve()) for p in args.paths):
        raise UsageError(f"--out {out}: is one of the runs to merge; choose another directory")
    if results.holds_results(out) and not args.overwrite:
        raise UsageError(f"--out {out}: holds the results of an earlier run; add --overwrite to replace them, or "
                         "choose another directory")
    try:
        command = " ".join(["loopmark merge", *args.paths, "--out", str(out)] + ["--mixed-cpus"] * args.mixed_cpus)
        records = write_merged(args.paths, out, command, args.mixed_cpus, args.partial)
    except results.OutputError as exc:
        print(f"loopmark merge: {exc}", file=sys.stderr)
        return EXIT_WRITE
    except ValueError as exc:  # an unreadable input, or runs that cannot be merged
        raise UsageError(str(exc)) from None
    print(f"merged {len(records)} cells of {len(args.paths)} runs into {out}/results.csv, {out}/results.json "
          f"(`loopmark report {out}` renders them)")
    return EXIT_OK


TRACE_OPTIONS = ("--steps", "--warmup", "--out", "--overwrite", "--strict", "--nproc-per-node", "--cell-timeout")


def cmd_trace(args) -> int:
    """Run a training script unmodified in this process and measure its steps (bench.trace). Exit 0 when it was
    measured (a note says so when the script ended before every step was), 1 when the script raised, exited with
    another status than 0 or never stepped (what it had is written all the same), 2 bad input, 3 unwritable results.
    Under torchrun (`--nproc-per-node N` starts it) every rank traces its own process and rank 0 writes a cell per
    rank; the exit status is the worst rank's. The launching command (`--nproc-per-node N`) imports no torch: its
    ranks do."""
    from bench import target as targets

    try:
        if args.module is not None:
            if not args.module:
                raise UsageError("-m: give the module to run (-m package.module [ARGS...])")
            target = targets.module_target(args.module[0], args.module[1:])
        elif args.script:
            target = targets.script_target(args.script[0], args.script[1:])
        else:
            raise UsageError("give the script to trace: loopmark trace [OPTIONS] SCRIPT.py [ARGS...], or -m MODULE "
                             "[ARGS...]")
    except targets.BadTarget as exc:
        raise UsageError(str(exc)) from None
    given = [f"--{name.replace('_', '-')}" for name in RENDEZVOUS if getattr(args, name) is not None]
    if given and not args.nproc_per_node:
        raise UsageError(f"{given[0]} is a torchrun option: it goes with --nproc-per-node N")
    rank, ranks = launcher.torchrun_rank()
    if args.nproc_per_node and not launcher.launched():  # the ranks run this command under torchrun
        return _launch_trace(args, _out_dir(args))
    from bench import distributed, trace, trace_ranks
    from bench.env import environment

    out = _out_dir(args) if rank == 0 else None  # rank 0 writes every rank's cell
    idle = ["before the script's first step"]  # what this rank's heartbeat says when no step is under way
    if ranks > 1:
        trace_ranks.unpublish(rank)
        # under the launching `loopmark trace`: its heartbeat, each step's, from a thread of its own
        distributed.beat_in_background(rank, lambda: trace.progress(idle[0]))
    env = environment()  # before the script runs, which may be shown a GPU this machine does not have
    steps = args.steps or trace.DEFAULT_STEPS
    warmup = trace.DEFAULT_WARMUP if args.warmup is None else args.warmup
    if rank == 0:
        print(f"loopmark trace: {target.command}: {warmup} warm-up steps, then {steps} steps per pass "
              f"({', '.join(trace.PHASES)})" + (f", on each of {ranks} ranks" if ranks > 1 else ""),
              file=sys.stderr, flush=True)

    def conclude(result: trace.Trace) -> int:
        """The summary, the results and the report of a finished trace (under torchrun: rank 0's, of every rank's
        record); the exit status."""
        if result.outcome.exception is not None:
            print((f"rank {rank}: " if ranks > 1 else "") + result.outcome.traceback_text(), end="", file=sys.stderr)
        if ranks == 1:
            code = _trace_written(args, out, env, [result.record], ranks)
            return code if code != EXIT_OK else result.exit_code
        trace_ranks.publish(result.record, result.exit_code)
        idle[0] = "its trace ended: waiting for the other ranks' records" if rank == 0 else "its trace ended"
        if rank:  # rank 0 exits with the worst rank's status; a rank that failed and exits so would have torchrun
            return EXIT_OK  # end rank 0 before it has written every rank's cell
        found = trace_ranks.collect(ranks, trace_ranks.RANKS_WAIT_S)
        code = _trace_written(args, out, env, [found[r]["record"] for r in sorted(found)], ranks)
        trace_ranks.clear_ranks()
        code = code if code != EXIT_OK else max(found[r]["exit_code"] for r in found)
        trace_ranks.publish_written(code)
        return code

    script_args = target.argv[1:]
    say = (lambda text: print(f"loopmark trace: {text}", file=sys.stderr, flush=True)) if rank == 0 else None
    # a script that calls os._exit ends this process there: the trace is concluded (written) before it ends
    result = trace.trace(target, steps, warmup, device_name=env.get("cpu_model"), on_exit=conclude, say=say)
    code = conclude(result)
    if result.outcome.exit_status == 2 and result.record.get("trace_steps_run") == 0 and any(
            a.split("=")[0] in TRACE_OPTIONS for a in script_args):
        print("loopmark trace: the script refused its arguments; loopmark's own options go before the script: "
              "loopmark trace --steps N SCRIPT.py [ARGS...]", file=sys.stderr)
    return code


def _trace_written(args, out: Path, env: dict, records: list[dict], ranks: int) -> int:
    """The summary of a trace's records (one, or one per rank: rank 0's in full, then every rank's line), its results
    and report: EXIT_OK, EXIT_WRITE, or with --strict 1 for a broken verdict or a pass with no step."""
    from bench import trace, trace_ranks
    from reports.findings import sync_sites
    from reports.results import OutputError, write_results
    from reports.table import printable

    if records:
        print()
        print(printable(trace.summary(records[0], sync_sites(records[0]))))
    if ranks > 1:
        missing = sorted(set(range(ranks)) - {r.get("rank") for r in records})
        print("\nranks:\n" + trace_ranks.ranks_table(records))
        if missing:
            print(f"rank(s) {', '.join(map(str, missing))}: no result (the rank failed or was ended before its trace "
                  "was done: see its output above)")
        failed = trace_ranks.first_failure(records)
        if failed:
            print(f"loopmark trace: {failed}", file=sys.stderr)
    if not records:
        return EXIT_FAIL
    try:
        write_results(out, env, records)
    except OutputError as exc:
        print(f"loopmark trace: {exc}", file=sys.stderr)
        return EXIT_WRITE
    reported = _report([out])
    print(f"\nwrote {out}/results.csv, {out}/results.json")
    if not reported:  # a report that could not be written (a full disk): exit 3, as for the results
        return EXIT_WRITE
    failed = [f"{r['workload']}: {f}" if ranks > 1 else f for r in records
              for f in (trace.strict_failures(r) if args.strict and r.get("status") != "error" else [])]
    if failed:
        print("loopmark trace --strict: " + "; ".join(failed), file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK if len(records) == ranks else EXIT_FAIL


RENDEZVOUS = ("nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "master_addr", "master_port")


def _launch_trace(args, out: Path) -> int:
    """`loopmark trace --nproc-per-node N`: this command again under torchrun, one process per rank (rank 0 writes
    every rank's cell to --out). When rank 0 could not (a rank failed and torchrun ended the others), the records the
    ranks published are written here."""
    from bench import trace_ranks

    child = ["--out", str(out), "--overwrite", *(["--strict"] if args.strict else [])]
    for name in ("steps", "warmup"):
        if getattr(args, name) is not None:
            child += [f"--{name}", str(getattr(args, name))]
    child += ["-m", *args.module] if args.module is not None else args.script
    rendezvous = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in RENDEZVOUS
                  if getattr(args, name) is not None]
    written, failed = launcher.launch_trace(child, args.nproc_per_node, rendezvous, trace_ranks.RANKS_DIR_ENV,
                                                lambda where: _ranks_left(args, out, where), args.cell_timeout)
    if failed:
        print(f"loopmark trace: {failed}", file=sys.stderr)
    return written if written is not None else EXIT_FAIL


def _ranks_left(args, out: Path, where: Path) -> int | None:
    """After a torchrun whose rank 0 wrote nothing: write the records the ranks published (None: there were none)."""
    from bench import trace_ranks
    from bench.env import environment

    ranks = args.nproc_per_node * (int(args.nnodes) if str(args.nnodes or "").isdigit() else 1)
    found = trace_ranks.collect(ranks, where=where)
    if not found:
        return None
    code = _trace_written(args, out, environment(), [found[r]["record"] for r in sorted(found)], ranks)
    return code if code != EXIT_OK else max([EXIT_FAIL] + [found[r]["exit_code"] for r in found])


# -- argument types: a bad value is one line and exit 2 ----------------------------------------------------

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value
    return parse


def _number(accept, must_be: str):
    """An argparse type: a finite float that `accept` takes, else one line saying what it must be."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {must_be}")
        return value
    return parse


_probability = _number(lambda v: 0 < v < 1, "between 0 and 1")
_non_negative = _number(lambda v: v >= 0, "a non-negative number")


def _shard(text: str) -> tuple[int, int]:
    """`--shard I/N`: shard I (1-based) of N."""
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 2/4)") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"{text}: I must be between 1 and N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loopmark", description="Benchmark and check PyTorch training-loop idioms.",
                epilog="exit status: 0 ok, 1 failed check, regression or (run --strict) failed cell, 2 bad input, "
                       "3 results or a report could not be written, 130 interrupted")
    p.add_argument("--version", action="version", version=f"loopmark {bench.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="variants and workloads")

    names = {"workload": "name or package.module:function (repeatable)",
             "variant": "name, a+b, or package.module:function (repeatable)"}
    c = sub.add_parser("check", help="correctness verdicts; exit 1 on an unexpected verdict or a broken "
                                     "variant of yours")
    c.add_argument("--workload", action="append", help=names["workload"])
    c.add_argument("--variant", action="append", help=names["variant"])
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--epochs", type=_int_at_least(1), help="default 2, as in `loopmark run`")
    c.add_argument("--steps", type=_int_at_least(1),
                   help="steps per epoch (default 3, or the workload's own; as in `loopmark run`)")
    c.add_argument("--seed", type=_int_at_least(0), default=0)
    c.add_argument("--jobs", type=_int_at_least(1), metavar="N",
                   help="on the CPU, check N cells at once in processes of their own (default: one per core, up to 4)")
    c.add_argument("--nproc-per-node", type=_int_at_least(1), metavar="N",
                   help="check the distributed variants (ddp_*), N processes on this machine under torchrun")
    c.add_argument("--cell-timeout", type=_non_negative, metavar="SECONDS", default=600,
                   help="with --nproc-per-node: end every rank when a cell makes no progress in this long and as much "
                        "again, a minute at most (a rank hung in a collective; default 600, 0: no limit)")

    r = sub.add_parser("run", help="measure every cell; write results.csv/json and a report")
    r.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    r.add_argument("--workload", action="append", help=names["workload"])
    r.add_argument("--variant", action="append", help=names["variant"])
    r.add_argument("--quick", action="store_true", help="fewer steps and repeats: a first look")
    r.add_argument("--extended", action="store_true",
                   help="also the idioms beyond the seed (mixed precision, compilation, CUDA graphs, optimizer "
                        "kernels, input pipeline, gradient accumulation, accuracy counting)")
    r.add_argument("--steps", type=_int_at_least(3), help="timed steps per block (>= 3)")
    r.add_argument("--repeats", type=_int_at_least(1), help="timed blocks per cell")
    r.add_argument("--warmup", type=_int_at_least(0), help="untimed steps before a cell's first block")
    r.add_argument("--seed", type=_int_at_least(0))
    r.add_argument("--out", help="output directory (default: a new results/<UTC time>/, results/latest points to it)")
    r.add_argument("--cell-timeout", type=_non_negative, metavar="SECONDS",
                   help="stop a cell that has worked this long in all (its passes and blocks) and mark it `timeout` "
                        "(default 600; 0: no limit)")
    r.add_argument("--strict", action="store_true",
                   help="exit 1 when a cell ends in error, timeout, diverged or oom, or a verdict is not as expected "
                        "(a built-in's declared verdict, a variant of yours not broken): for CI")
    r.add_argument("--no-report", action="store_true",
                   help="write results.csv and results.json only: no report or plots (`loopmark report DIR` makes "
                        "them later)")
    r.add_argument("--resume", action="store_true", help="skip cells already finished in --out (default: in "
                                                         "results/latest)")
    r.add_argument("--overwrite", action="store_true", help="replace the results an --out directory already holds "
                                                            "(without it, or --resume, such an --out is refused)")
    r.add_argument("--nproc-per-node", type=_int_at_least(1), metavar="N",
                   help="run the distributed variants (ddp_*; with --extended also the seed's idioms under DDP), N "
                        "processes on this machine under torchrun: gloo on the CPU, nccl on CUDA")
    r.add_argument("--shard", type=_shard, metavar="I/N",
                   help="run only shard I of N of the planned cells (a workload's cells on a device stay in one "
                        "shard); `loopmark merge` puts the N results together")

    s = sub.add_parser("selfcheck", help="measure the harness itself on this machine; exit 1 if a goal is missed")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--workload", help="default mlp")

    rep = sub.add_parser("report", help="report.md, report.html and plots from results")
    rep.add_argument("paths", nargs="+", help="results directories, results.json or pytest-benchmark JSON files")
    rep.add_argument("--out", help="directory for the report (default: the first input's results directory; "
                                   "for a JSON file not named results.json, NAME-report/ beside it)")

    cmp = sub.add_parser("compare", help="compare two runs; exit 1 on a regression",
                         description="Compare a candidate loopmark run against a baseline run.",
                         epilog="exit status: 0 no regression, 1 regression, 2 unusable input")
    cmp.add_argument("baseline", help="results directory, results.json or pytest-benchmark JSON")
    cmp.add_argument("candidate", help="results directory, results.json or pytest-benchmark JSON")
    cmp.add_argument("--max-slowdown", type=_non_negative, default=5.0, metavar="PCT",
                     help="smallest slowdown of the median step time that counts, in %% (default 5)")
    cmp.add_argument("--alpha", type=_probability, default=0.01, metavar="A",
                     help="significance level of the Mann-Whitney U test (default 0.01)")
    cmp.add_argument("--format", choices=["text", "md"], default="text", help="output format (default text)")
    cmp.add_argument("--only-deterministic", action="store_true",
                     help="status, syncs/step, ops/step, verdict and retains_graph only (no time, no memory)")
    cmp.add_argument("--memory-threshold", type=_non_negative, default=5.0, metavar="PCT",
                     help="largest allowed growth of peak memory, in %% (default 5)")

    mrg = sub.add_parser("merge", help="put the results of several runs (the shards of one) into one",
                         description="Merge results directories (the shards of `loopmark run --shard I/N`) into one. "
                                     "Refused, exit 2, when the runs differ in settings, loopmark or torch version, "
                                     "planned devices or device model, or hold the same cell.")
    mrg.add_argument("paths", nargs="+", help="results directories or results.json files")
    mrg.add_argument("--out", required=True, help="directory for the merged results.json and results.csv")
    mrg.add_argument("--overwrite", action="store_true", help="replace the results --out already holds")
    mrg.add_argument("--mixed-cpus", action="store_true",
                     help="accept runs on different CPU models (each cell keeps its own device_name)")
    mrg.add_argument("--partial", action="store_true",
                     help="accept shards that are not every shard of one run (by default a missing shard is refused)")

    t = sub.add_parser("trace", help="run a training script unmodified and measure its steps: syncs (as on CUDA), "
                                     "operators, time, memory, kept autograd graphs",
                       usage="loopmark trace [-h] [--steps N] [--warmup W] [--out DIR] [--overwrite] [--strict] "
                             "[--nproc-per-node N [--cell-timeout S] [torchrun's rendezvous options]] "
                             "(SCRIPT.py | -m MODULE) [ARGS ...]",
                       description="Run SCRIPT.py ARGS (or -m MODULE ARGS) in this process as python would, and "
                                   "measure its training steps (a step ends at optimizer.step()): a warm-up, then a "
                                   "pass each counting syncs and operators, auditing what each optimizer step "
                                   "consumed (the verdict), timing, and measuring memory, then the script is stopped. "
                                   "Everything after the script (or the module) is its own.",
                       epilog="exit status: 0 measured, 1 the script raised, exited with another status or never "
                              "stepped (with --strict also: a broken verdict, a pass with no step), 2 bad input, 3 "
                              "results could not be written")
    t.add_argument("--steps", type=_int_at_least(1), metavar="N", help="steps per pass (default 20)")
    t.add_argument("--warmup", type=_int_at_least(0), metavar="W", help="steps before the first pass (default 5)")
    t.add_argument("--out", help="output directory (default: a new results/<UTC time>/, results/latest points to it)")
    t.add_argument("--overwrite", action="store_true", help="replace the results an --out directory already holds")
    t.add_argument("--strict", action="store_true",
                   help="exit 1 when the verdict is broken, or when a pass measured no step (for CI)")
    t.add_argument("--nproc-per-node", type=_int_at_least(1), metavar="N",
                   help="run the script under torchrun, N ranks on this machine, each traced (a cell per rank)")
    t.add_argument("--cell-timeout", type=_non_negative, metavar="SECONDS", default=600,
                   help="with --nproc-per-node: the longest a collective waits (the script's process group timeout "
                        "at most this); every rank is ended when none steps in this long and as much again, a minute "
                        "at most (a rank hung, or waiting in a collective; default 600, 0: no limit)")
    for name in RENDEZVOUS:
        t.add_argument(f"--{name.replace('_', '-')}", metavar="VALUE",
                       help=f"passed to torchrun as --{name.replace('_', '-')} (with --nproc-per-node)")
    t.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE",
                   help="run a module as `python -m MODULE ARGS` does")
    t.add_argument("script", nargs=argparse.REMAINDER, metavar="SCRIPT.py [ARGS]",
                   help="the script and its own arguments")
    t.set_defaults(resume=False)
    return p


def _commands(parser: argparse.ArgumentParser) -> str:
    """The usage line and each command with its help, one line each (whatever the terminal's width)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    width = max(map(len, sub.choices))
    lines = [f"  {a.dest:<{width}}  {a.help}" for a in sub._choices_actions]
    return "\n".join([f"usage: {parser.prog} COMMAND [OPTIONS] (`{parser.prog} COMMAND --help` for its options)",
                      "commands:", *lines])


COMMANDS = {"list": cmd_list, "check": cmd_check, "run": cmd_run, "selfcheck": cmd_selfcheck,
            "report": cmd_report, "compare": cmd_compare, "merge": cmd_merge, "trace": cmd_trace}


# the modules each command needs (torch alone takes seconds), imported before the command starts (`_import_for`)
IMPORTS = {"list": ("loops.variants", "loops.workloads", "reports.table"),  # `import loops` alone loads no torch
           "check": ("bench.runner", "reports.table"), "run": ("bench.runner", "reports.report"),
           "selfcheck": ("bench.selfcheck",),
           "report": ("reports.report",), "compare": ("reports.compare", "reports.load"), "merge": ("reports.merge",),
           "trace": ("bench.trace", "reports.report", "reports.findings")}
LAUNCHING = ("trace",)  # commands whose launching process (--nproc-per-node N) imports what it needs itself


def _import_for(command: str) -> None:
    """Import what `command` needs while Ctrl-C ends the process at once: one line, exit 130. An import interrupted
    half-way can leave torch or numpy half initialised, and some of their imports swallow the KeyboardInterrupt: the
    command would go on as if never interrupted, or fail later with a traceback. Nothing is written yet to lose."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    if previous not in (None, signal.SIG_IGN):  # not where Ctrl-C is ignored, nor outside the main thread

        def stop(signum, frame):
            os.write(2, b"interrupted\n")
            os._exit(EXIT_INTERRUPTED)

        signal.signal(signal.SIGINT, stop)
    try:
        for name in IMPORTS.get(command, ()):
            importlib.import_module(name)
    finally:
        if previous not in (None, signal.SIG_IGN):
            signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere, while the arguments are parsed too
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    spread = sys.modules.get("bench.distributed")
    if spread is not None and launcher.launched() and argv is None:
        # a rank, done: its process group is closed, its results written. Leaving through the interpreter's teardown
        # can abort in a collective library's thread (`terminate called without an active exception`), which torchrun
        # would report as this rank's failure
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str]) -> int:
    if not argv:  # no command: what there is to do, on stderr and exit 2 as for any other incomplete command line
        print(_commands(build_parser()), file=sys.stderr)
        return EXIT_USAGE
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"loopmark{' ' + command if command else ''}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    sys.path.insert(0, os.getcwd())  # so that a user's package.module:function in this directory imports
    try:
        _check_builtin_names(args)
        if not (args.command in LAUNCHING and getattr(args, "nproc_per_node", None) and not launcher.launched()):
            _import_for(args.command)
        return COMMANDS[args.command](args)
    except (UsageError, ValueError) as exc:  # report and compare raise ValueError for unusable files
        if not isinstance(exc, UsageError) and args.command not in ("report", "compare"):
            raise
        from reports.table import printable

        print(printable(f"loopmark {args.command}: {exc}"), file=sys.stderr)  # exc may quote a file's text
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
