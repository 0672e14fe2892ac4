"""The `loopmark` command line: one argparse tree with a subcommand each for list, check, run, selfcheck,
report and compare.

Exit status: 0 success, 1 a failed check or a regression, 2 bad input (one line, no traceback), 130
interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import bench

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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
            resolve_workload(w)
        for v in variants or []:
            resolve_variant(v)
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

    from bench import correctness, runner
    from loops import WORKLOADS, builtin_names, resolve_variant, resolve_workload
    from reports.results import as_expected
    from reports.table import format_table

    _resolve_names(args.workload, args.variant)
    device = torch.device(_devices(args.device, "cpu")[0])
    rows, failures = [], 0
    for wname in args.workload or list(WORKLOADS):
        workload = resolve_workload(wname)
        cache: dict = {}
        for vname in args.variant or builtin_names():
            variant = resolve_variant(vname)
            _status(f"checking {workload.name} {variant.name}")
            try:
                r = correctness.check(workload, variant, device, args.epochs or correctness.CHECK_EPOCHS,
                                      args.steps, args.seed, cache)
            except runner.CELL_FAULTS as exc:  # a user's loop that raises or exits
                r = {"verdict": "error", "expected_verdict": variant.expected_for(workload.name),
                     "verdict_reason": runner.fault_text(exc)}
            expected = r["expected_verdict"]
            status = "skipped" if r["verdict"] == "skipped" else "ok"
            matches = as_expected(status, r["verdict"], expected)
            bad = matches is False or (matches is None and r["verdict"] in ("broken", "error"))
            failures += bad
            rows.append([workload.name, variant.name, r["verdict"], expected, r["verdict_reason"]
                         + ("  <-- FAIL" if bad else "")])
    _status("")
    print(format_table(["workload", "variant", "verdict", "expected", "reason"], rows))
    print(f"\n{failures} failing cell(s)" if failures else "\nall verdicts as expected")
    return EXIT_FAIL if failures else EXIT_OK


def _status(text: str) -> None:
    """A transient status line on a terminal (nothing in a log)."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    from bench import runner

    _resolve_names(args.workload, args.variant)
    devices = _devices(args.device, "cpu, all")
    settings = runner.QUICK if args.quick else runner.Settings()
    settings = runner.replace_settings(settings, steps=args.steps, repeats=args.repeats, seed=args.seed,
                                       warmup=args.warmup)
    if settings.steps < 3:
        raise UsageError("--steps must be >= 3")
    out = Path(args.out)
    groups = runner.plan(devices, args.workload, args.variant, args.extended)
    run = runner.Runner(out, settings, resume=args.resume, progress=_progress_printer(groups))
    try:
        records = run.run(groups)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(run.records)} finished cell(s) kept in {out}/results.csv and results.json",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    _summary(records)
    _report([out])
    print(f"\nwrote {out}/results.csv, {out}/results.json")
    return EXIT_OK


def _progress_printer(groups):
    """A tqdm bar over cells on a terminal, plain lines otherwise (CI logs)."""
    from bench.runner import _plain_progress

    total = sum(len(g.variants) for g in groups)
    if not sys.stderr.isatty():
        return _plain_progress
    from tqdm import tqdm

    bar = tqdm(total=total, unit="cell", file=sys.stderr)

    def progress(record):
        bar.update(1)
        bar.set_postfix_str(f"{record['workload']}/{record['variant']}/{record['device']} {record['status']}")
    return progress


def _summary(records: list[dict]) -> None:
    from reports.table import format_table

    def fmt(r, key, spec):
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    rows = [[r["device"], r["workload"], r["variant"], fmt(r, "samples_per_s", ",.0f"),
             fmt(r, "ratio_to_baseline", ".3f"), fmt(r, "syncs_per_step", ".2f"),
             fmt(r, "memory_growth_bytes_per_step", ",.0f"),
             (r.get("verdict") or "-") + ("!" if r.get("verdict_as_expected") is False else ""), r["status"]]
            for r in records]
    print()
    print(format_table(["device", "workload", "variant", "samples/s", "ratio", "syncs", "growth B/st", "verdict",
                        "status"], rows, right=[3, 4, 5, 6]))


def _report(paths) -> None:
    try:
        from reports.report import write_report

        written = write_report(paths)
        print(f"report: {', '.join(str(p) for p in written if str(p).endswith(('.md', '.html')))}")
    except Exception as exc:  # the results are safe on disk; a report can be made again with `loopmark report`
        print(f"report not written ({type(exc).__name__}: {exc})", file=sys.stderr)


def cmd_selfcheck(args) -> int:
    from bench import selfcheck

    device = _devices(args.device, "cpu")[0]
    return selfcheck.main(device, args.workload or "mlp")


def cmd_report(args) -> int:
    from reports.report import write_report

    written = write_report([Path(p) for p in args.paths], Path(args.out) if args.out else None)
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loopmark", description="Benchmark and check PyTorch training-loop idioms.",
                epilog="exit status: 0 ok, 1 failed check or regression, 2 bad input, 130 interrupted")
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
    r.add_argument("--out", default="results/latest", help="output directory (default results/latest)")
    r.add_argument("--resume", action="store_true", help="skip cells already finished in --out")

    s = sub.add_parser("selfcheck", help="measure the harness itself on this machine; exit 1 if a goal is missed")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--workload", help="default mlp")

    rep = sub.add_parser("report", help="report.md, report.html and plots from results")
    rep.add_argument("paths", nargs="+", help="results directories, results.json or pytest-benchmark JSON files")
    rep.add_argument("--out", help="directory for the report (default: next to the first input)")

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
    return p


COMMANDS = {"list": cmd_list, "check": cmd_check, "run": cmd_run, "selfcheck": cmd_selfcheck,
            "report": cmd_report, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
        return COMMANDS[args.command](args)
    except (UsageError, ValueError) as exc:  # report and compare raise ValueError for unusable files
        if not isinstance(exc, UsageError) and args.command not in ("report", "compare"):
            raise
        print(f"loopmark {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
