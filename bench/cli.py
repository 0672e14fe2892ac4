"""The `loopmark` command line: list, check, run, selfcheck, report, compare."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input: printed as one line, exit 2."""


def _devices(name: str) -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible to torch here; valid: cpu, all")
    if name == "all":
        return ["cuda", "cpu"] if cuda else ["cpu"]
    return [name]


def _resolve_names(workloads, variants):
    """Fail early, with one line, on any name that does not resolve."""
    from loops import resolve_variant, resolve_workload

    for w in workloads or []:
        resolve_workload(w)
    for v in variants or []:
        resolve_variant(v)


def cmd_list(args) -> int:
    from loops import BUILTINS, WORKLOADS, resolve_variant, resolve_workload

    print(f"{'variant':38s} {'kind':5s} {'idiom':20s} {'expected verdict':28s} description")
    for name in BUILTINS:
        v = resolve_variant(name)
        expected = ", ".join(f"{k}: {x}" if k != "*" else x for k, x in v.expected.items())
        print(f"{name:38s} {v.kind:5s} {v.idiom:20s} {expected:28s} {v.description}")
    print("\ncompose variants with '+', e.g. tensor_sum+set_to_none_false; your own: package.module:function")
    print(f"\n{'workload':12s} {'batch':>5s}  description")
    for name in WORKLOADS:
        w = resolve_workload(name)
        print(f"{name:12s} {w.batch_size:5d}  {w.description}")
    return EXIT_OK


def cmd_check(args) -> int:
    import torch

    from bench import correctness
    from loops import WORKLOADS, builtin_names, resolve_variant, resolve_workload, verdict_matches

    _resolve_names(args.workload, args.variant)
    device = torch.device(_devices(args.device)[0])
    failures = 0
    print(f"{'workload':12s} {'variant':38s} {'verdict':10s} {'expected':10s} reason")
    for wname in args.workload or list(WORKLOADS):
        workload = resolve_workload(wname)
        cache: dict = {}
        for vname in args.variant or builtin_names():
            variant = resolve_variant(vname)
            try:
                r = correctness.check(workload, variant, device, args.epochs, args.steps, args.seed, cache)
            except Exception as exc:  # a user's loop that raises
                r = {"verdict": "error", "expected_verdict": variant.expected_for(workload.name),
                     "verdict_reason": f"{type(exc).__name__}: {exc}".split("\n")[0]}
            expected = r["expected_verdict"]
            if r["verdict"] == "skipped":
                bad = False
            elif expected:
                bad = not verdict_matches(r["verdict"], expected)
            else:
                bad = r["verdict"] in ("broken", "error")
            failures += bad
            flag = "  <-- FAIL" if bad else ""
            print(f"{workload.name:12s} {variant.name:38s} {r['verdict']:10s} {expected or '-':10s} "
                  f"{r['verdict_reason']}{flag}", flush=True)
    print(f"\n{failures} failing cell(s)" if failures else "\nall verdicts as expected")
    return EXIT_FAIL if failures else EXIT_OK


def cmd_run(args) -> int:
    from bench import runner

    _resolve_names(args.workload, args.variant)
    devices = _devices(args.device)
    settings = runner.QUICK if args.quick else runner.Settings()
    settings = runner.replace_settings(settings, steps=args.steps, repeats=args.repeats, seed=args.seed,
                                       warmup=args.warmup)
    if settings.steps < 3 or settings.repeats < 1:
        raise UsageError("--steps must be >= 3 and --repeats >= 1")
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
    from loops import verdict_matches

    print(f"\n{'device':6s} {'workload':12s} {'variant':38s} {'samples/s':>11s} {'ratio':>6s} {'syncs':>6s} "
          f"{'growth B/st':>11s} {'verdict':10s} status")
    def fmt(r, key, spec):
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in records:
        verdict = r.get("verdict") or "-"
        if r.get("expected_verdict") and r["status"] != "skipped" and \
                not verdict_matches(r.get("verdict"), r["expected_verdict"]):
            verdict += "!"
        print(f"{r['device']:6s} {r['workload']:12s} {r['variant']:38s} {fmt(r, 'samples_per_s', ',.0f'):>11s} "
              f"{fmt(r, 'ratio_to_baseline', '.3f'):>6s} {fmt(r, 'syncs_per_step', '.2f'):>6s} "
              f"{fmt(r, 'memory_growth_bytes_per_step', ',.0f'):>11s} {verdict:10s} {r['status']}")


def _report(paths) -> None:
    try:
        from reports.report import write_report

        written = write_report(paths)
        print(f"report: {', '.join(str(p) for p in written if str(p).endswith(('.md', '.html')))}")
    except Exception as exc:  # the results are safe on disk; a report can be made again with `loopmark report`
        print(f"report not written ({type(exc).__name__}: {exc})", file=sys.stderr)


def cmd_selfcheck(args) -> int:
    from bench import selfcheck

    device = _devices(args.device)[0]
    return selfcheck.main(device, args.workload or "mlp")


def cmd_report(args) -> int:
    from reports.report import write_report

    try:
        written = write_report([Path(p) for p in args.paths], Path(args.out) if args.out else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for p in written:
        print(p)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopmark", description="Benchmark and check PyTorch training-loop idioms.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="variants and workloads")

    c = sub.add_parser("check", help="correctness verdicts; exit 1 on an unexpected verdict or a broken "
                                     "variant of yours")
    c.add_argument("--workload", action="append", help="name or package.module:function (repeatable)")
    c.add_argument("--variant", action="append", help="name, a+b, or package.module:function (repeatable)")
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--epochs", type=int, default=2)
    c.add_argument("--steps", type=int, default=3, help="steps per epoch")
    c.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("run", help="measure every cell; write results.csv/json and a report")
    r.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    r.add_argument("--workload", action="append", help="name or package.module:function (repeatable)")
    r.add_argument("--variant", action="append", help="name, a+b, or package.module:function (repeatable)")
    r.add_argument("--quick", action="store_true", help="fewer steps and repeats: a first look")
    r.add_argument("--extended", action="store_true",
                   help="also the idioms beyond the seed (mixed precision, compilation, CUDA graphs, optimizer "
                        "kernels, input pipeline, gradient accumulation, accuracy counting)")
    r.add_argument("--steps", type=int, help="timed steps per block")
    r.add_argument("--repeats", type=int, help="timed blocks per cell")
    r.add_argument("--warmup", type=int, help="untimed steps before a cell's first block")
    r.add_argument("--seed", type=int)
    r.add_argument("--out", default="results/latest", help="output directory (default results/latest)")
    r.add_argument("--resume", action="store_true", help="skip cells already finished in --out")

    s = sub.add_parser("selfcheck", help="measure the harness itself on this machine")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--workload", help="default mlp")

    rep = sub.add_parser("report", help="report.md, report.html and plots from results")
    rep.add_argument("paths", nargs="+", help="results directories, results.json or pytest-benchmark JSON files")
    rep.add_argument("--out", help="directory for the report (default: next to the first input)")

    sub.add_parser("compare", help="compare two runs; exit 1 on a regression", add_help=False)
    return p


COMMANDS = {"list": cmd_list, "check": cmd_check, "run": cmd_run, "selfcheck": cmd_selfcheck,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from reports.compare import main as compare_main

        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    sys.path.insert(0, os.getcwd())  # so that a user's package.module:function in this directory imports
    from loops import BadName

    try:
        return COMMANDS[args.command](args)
    except (UsageError, BadName) as exc:
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
