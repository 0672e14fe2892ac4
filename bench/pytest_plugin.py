"""loopmark in a user's own test suite: a pytest plugin, installed with the package (entry point `pytest11: loopmark`).

    def test_my_loop(loopmark):
        result = loopmark.measure(workload=make_workload, variant=train_one_epoch, steps=16)
        loopmark.assert_no_new_syncs(result, max_per_step=1)
        loopmark.assert_correct(result)
        assert result.peak_memory_bytes < 2**30

`measure` runs the passes of `loopmark run` on one cell (`bench.runner.untimed_passes`: correctness, syncs, memory,
each on a freshly built cell), then times it, and returns the record `loopmark run` writes (`reports.results.record`)
as an object whose attributes are the results.csv columns. With pytest-benchmark active, the timing is its
`benchmark` fixture's (pedantic mode, one round per block of `steps` steps, the block's clock made outside the timed
function), and the record travels in `extra_info["loopmark"]`: `--benchmark-json`, `--benchmark-save` and
`--benchmark-compare` work as usual, and `loopmark report` / `loopmark compare` read the JSON. Without it (`-p
no:benchmark`), or where it times nothing (`--benchmark-disable`, under xdist), the timing is `loopmark run`'s own
(`bench.runner.Runner`'s timing pass on this one cell).

Options: `--loopmark-device cpu|cuda`, `--loopmark-steps N` (defaults for the tests that do not give `device=` or
`steps=`), `--loopmark-out DIR` (every cell measured in the session, in DIR/results.json and results.csv). The marker
`@pytest.mark.loopmark(max_syncs_per_step=1, verdict="equivalent")` checks every result the test measured once its
body has passed.

The plugin imports neither torch nor the harness until a test measures something: `pytest --help` and sessions that
do not use the fixture are as they were.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from bench.cli import _int_at_least  # one parser of numeric options: a bad value is one line
from reports.results import site_code

# a test's defaults: enough blocks for `loopmark compare`'s time gate (p < 0.01 needs 5), short blocks, no time limit
# of loopmark's own (its SIGALRM timer would cancel pytest-timeout's; pytest-timeout is the tool for that here)
DEFAULTS = {"steps": 16, "repeats": 5, "warmup": 2, "memory_steps": 12, "cell_timeout": 0}
MARKER_ARGS = ("max_syncs_per_step", "verdict")
CORRECT = ("identical", "equivalent", "different")  # each step used a function of its own batch's gradient alone
STATE = pytest.StashKey["_Session"]()


# -- hooks ------------------------------------------------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("loopmark", "loopmark (the `loopmark` fixture measures a training loop)")
    group.addoption("--loopmark-device", choices=("cpu", "cuda"), default=None,
                    help="device of the cells measured by tests that do not give device= (default cpu)")
    group.addoption("--loopmark-steps", type=_int_at_least(3), default=None, metavar="N",
                    help=f"timed steps per block for tests that do not give steps= (default {DEFAULTS['steps']})")
    group.addoption("--loopmark-out", default=None, metavar="DIR",
                    help="write every cell measured in the session to DIR/results.json and DIR/results.csv "
                         "(`loopmark report DIR`, `loopmark compare` read them)")


def pytest_configure(config):
    config.addinivalue_line("markers", "loopmark(max_syncs_per_step=None, verdict=None): once the test has passed, "
                                       "check every cell its `loopmark` fixture measured: at most this many syncs "
                                       "per step; a verdict that meets this one (or one of a list)")
    config.pluginmanager.register(_FixtureTimedByBenchmark() if _pytest_benchmark(config) else _Fixture(),
                                  "loopmark-fixture")
    out = config.getoption("loopmark_out")
    if out:
        from reports.results import check_writable

        try:
            check_writable(out)
        except ValueError as exc:
            raise pytest.UsageError(f"--loopmark-out: {exc}") from None
    config.stash[STATE] = _Session(config, out)


def _pytest_benchmark(config) -> bool:
    """Whether pytest-benchmark's plugin is loaded (not `-p no:benchmark`)."""
    return any(getattr(p, "__name__", "").startswith("pytest_benchmark") for p in config.pluginmanager.get_plugins())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """`@pytest.mark.loopmark(...)`: checked once the test body has passed, against every result it measured."""
    outcome = yield
    marker = item.get_closest_marker("loopmark")
    if marker is not None:
        _check_marker(item, marker)
    return outcome


def pytest_sessionfinish(session):
    """An xdist worker hands its cells to the controller, which writes --loopmark-out."""
    config = session.config
    state = config.stash.get(STATE, None)
    if state is not None and state._scratch is not None:
        shutil.rmtree(state._scratch, ignore_errors=True)
    if state is not None and state.records and hasattr(config, "workeroutput"):
        from reports.results import _clean

        payload = {"environment": state.environment(), "cells": [[r, state.tests[k]] for k, r in state.records.items()]}
        config.workeroutput["loopmark"] = json.loads(json.dumps(_clean(payload)))  # plain types for execnet


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller: the cells a worker measured."""
    state = node.config.stash.get(STATE, None)
    payload = (getattr(node, "workeroutput", None) or {}).get("loopmark")
    if state is None or not payload:
        return
    state.env = state.env or payload["environment"]
    for record, nodeid in payload["cells"]:
        state.add(record, nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """loopmark's environment in pytest-benchmark's machine_info (`loopmark report` shows it), without what changes
    from run to run (time, command, GPU clocks and temperature): pytest-benchmark warns when machine_info differs."""
    state = config.stash.get(STATE, None)
    if state is None or not state.records:
        return
    env = {k: v for k, v in state.environment().items() if k not in ("timestamp", "command")}
    if isinstance(env.get("gpu"), dict):
        env["gpu"] = {k: env["gpu"].get(k) for k in ("name", "memory_total_bytes", "capability", "driver")}
    machine_info["loopmark"] = env


# -- the fixture --------------------------------------------------------------------------------------------------

class _Fixture:
    @pytest.fixture
    @staticmethod
    def loopmark(request):
        """Measure a training loop as `loopmark run` does: `loopmark.measure(workload=..., variant=..., steps=...)`;
        `loopmark.assert_no_new_syncs(result, max_per_step=...)`, `loopmark.assert_correct(result)`."""
        return Loopmark(request, None)


class _FixtureTimedByBenchmark:
    @pytest.fixture
    @staticmethod
    def loopmark(request, benchmark):
        """Measure a training loop as `loopmark run` does, timed by pytest-benchmark's `benchmark` fixture:
        `loopmark.measure(workload=..., variant=..., steps=...)`; `loopmark.assert_no_new_syncs(result,
        max_per_step=...)`, `loopmark.assert_correct(result)`."""
        return Loopmark(request, benchmark)


class Loopmark:
    """The `loopmark` fixture. `results`: what this test has measured, in order."""

    def __init__(self, request, benchmark):
        self._request, self._benchmark = request, benchmark
        self._session: _Session = request.config.stash[STATE]
        self.results: list[LoopmarkResult] = []

    def measure(self, workload, variant, *, steps: int | None = None, device=None, repeats: int | None = None,
                warmup: int | None = None, seed: int | None = None, check_steps: int | None = None,
                memory_steps: int | None = None, nproc_per_node: int = 2) -> LoopmarkResult:
        """Measure one cell: `variant` (a loop function `fn(run)`, a built-in name such as "baseline", or
        "package.module:function") on `workload` (a function returning a `loops.Workload`, a Workload, or a name).

        Runs `loopmark run`'s untimed passes (correctness, syncs, memory) and `repeats` timed blocks of `steps` steps
        after `warmup` untimed steps, and returns the cell's record. The first cell of a test is timed by
        pytest-benchmark when it is active, the others by loopmark. A loop that raises while measured fails the
        test with its traceback; a cell that ends in error, timeout or oom while timed fails it with the message.
        `device` and `steps` default to --loopmark-device / --loopmark-steps, then cpu and 16.

        A distributed variant (ddp_*, or a loop marked `@loops.distributed()`) runs as `loopmark run --nproc-per-node
        N` runs it: `nproc_per_node` processes under torchrun, its group's ddp_baseline first, timed by loopmark (other
        processes are not pytest-benchmark's to time). Its workload and variant must then be importable by name: a
        name, or a function defined at the top level of a module."""
        __tracebackhide__ = True
        import torch

        from bench import runner
        from bench.cell import stage_batches
        from reports import results

        s = self._session.settings(steps=steps, repeats=repeats, warmup=warmup, seed=seed, check_steps=check_steps,
                                   memory_steps=memory_steps)
        dev = self._device(device, torch)
        v = _variant(variant)
        if v.kind == "ddp":
            return self._measure_distributed(workload, v, self._device(device, torch), s, nproc_per_node)
        wl, cache = self._session.workload(workload)
        if v.requires == "cuda" and dev.type != "cuda":
            pytest.skip(f"{v.name} needs a CUDA GPU")
        staged = stage_batches(wl, "test" if v.kind == "eval" else "train", s.steps, dev)
        spec = runner.cell_spec(wl, v, dev, s)
        m = results.Measurement(figures=runner.untimed_passes(wl, v, dev, s, staged, cache))
        benchmark = self._benchmark
        if benchmark is not None and benchmark.enabled and benchmark.stats is None and not self.results:
            time_with_benchmark(benchmark, wl, v, dev, s, staged, m)
        else:
            if benchmark is not None and not benchmark.enabled and not self.results:
                benchmark.pedantic(lambda: None)  # pytest-benchmark times nothing here (xdist, --benchmark-disable)
            benchmark = None
            _time_own(self._session.scratch(), wl, v, dev, s, staged, spec, m)
        record = alone_record(spec, m, s.seed)
        record["test_id"] = self._request.node.nodeid
        if benchmark is not None:
            benchmark.extra_info["loopmark"] = results._clean({**record, "steps_per_round": s.steps})
        return self._keep(record)

    def _keep(self, record: dict) -> LoopmarkResult:
        """A measured cell: in the session's results and this test's; a fault fails the test with its message."""
        __tracebackhide__ = True
        self._session.add(record, self._request.node.nodeid)
        result = LoopmarkResult(record)
        self.results.append(result)
        if record["status"] in ("error", "timeout", "oom"):
            pytest.fail(f"{_cell_name(result)}: {record['status']}: {record.get('error')}", pytrace=False)
        return result

    def _measure_distributed(self, workload, v, dev, s, nproc: int) -> LoopmarkResult:
        """A distributed cell, measured by `loopmark run --nproc-per-node` in processes of its own."""
        __tracebackhide__ = True
        import os
        import subprocess
        import sys

        from reports import results

        name = workload if isinstance(workload, str) else _importable(workload, "workload")
        out = Path(tempfile.mkdtemp(prefix="ddp-", dir=self._session.scratch()))
        cmd = [sys.executable, "-m", "bench", "run", "--nproc-per-node", str(nproc), "--device", dev.type,
               "--workload", name, "--variant", v.name, "--steps", str(s.steps), "--repeats", str(s.repeats),
               "--warmup", str(s.warmup), "--seed", str(s.seed), "--out", str(out / "run"), "--no-report"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this session imports
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not (out / "run" / "results.json").exists():
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            pytest.fail(f"{v.name}: loopmark run --nproc-per-node {nproc} failed: {lines[-1] if lines else '?'}",
                        pytrace=False)
        found = [r for r in results.read_results(out / "run")[1] if r["variant"] == v.name]
        if not found:
            pytest.fail(f"{v.name}: no cell in {out / 'run'}", pytrace=False)
        return self._keep({**found[0], "test_id": self._request.node.nodeid})

    def _device(self, device, torch):
        __tracebackhide__ = True
        option = self._request.config.getoption("loopmark_device")
        dev = torch.device(device or option or "cpu")
        if dev.type == "cuda" and not torch.cuda.is_available():
            if device is None:
                pytest.fail("--loopmark-device cuda: no CUDA GPU is visible to torch here", pytrace=False)
            pytest.skip("needs a CUDA GPU")
        return dev

    @staticmethod
    def assert_no_new_syncs(result: LoopmarkResult, max_per_step: float = 0) -> None:
        __tracebackhide__ = True
        assert_no_new_syncs(result, max_per_step)

    @staticmethod
    def assert_correct(result: LoopmarkResult, verdict=None) -> None:
        __tracebackhide__ = True
        assert_correct(result, verdict)


def _importable(fn, what: str) -> str:
    """`package.module:function` of a top-level function, which another process can import."""
    __tracebackhide__ = True
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or not callable(fn) or "<" in qualname or "." in qualname:
        pytest.fail(f"{what} {fn!r}: a distributed cell runs in other processes; give a name or a function defined "
                    "at the top level of a module", pytrace=False)
    return f"{module}:{qualname}"


def _variant(variant):
    from loops import Variant, resolve_variant
    from loops.variants import user_variant

    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str):
        return resolve_variant(variant)
    if callable(variant):
        return user_variant(variant)
    raise TypeError(f"variant: a loop function fn(run), a built-in name or 'package.module:function', not "
                    f"{type(variant).__name__}")


def time_with_benchmark(benchmark, workload, variant, device, s, staged, m, warmup_rounds: int = 0) -> None:
    """pytest-benchmark times `s.repeats` rounds (after `warmup_rounds` untimed ones), one block of the variant's loop
    each, on a cell warmed up as `loopmark run` warms it; the blocks' per-step times go into `m`. Each round's clock
    (CUDA events pre-created) is made by `setup`, outside the timed function; the block marks its steps as in
    `loopmark run` (one timestamp per batch, a single synchronize at its end on CUDA), so the record holds loopmark's
    per-step times of the very blocks pytest-benchmark timed. The load each round ran under is read as `loopmark run`
    reads it (`bench.timing.LoadWatch`, from `setup` to the next round's, outside the timed function) into
    `m.block_load`, from which the record's `reliability` is judged."""
    from bench import runner
    from bench.cell import build_cell, graph_breaks
    from bench.timing import LoadWatch, StepClock, run_block

    cell = build_cell(workload, variant, device, s.seed)
    breaks, start = graph_breaks(), time.perf_counter()
    runner._warm(cell, staged, s.warmup)  # compile time lands here, never in a timed round
    m.figures.update(warmup_time_s=time.perf_counter() - start, graph_breaks=graph_breaks() - breaks)
    reported = []
    if benchmark.group is None:  # a `@pytest.mark.benchmark(group=...)` wins
        benchmark.group = f"loopmark {workload.name} {device.type}"

    watches: list = []  # one per round, left at the next round's setup (pedantic's teardown is not in every version)

    def stop_watch():
        if watches and not watches[-1].figures:
            watches[-1].__exit__(None, None, None)
            m.block_load.append(watches[-1].figures)

    def setup():
        stop_watch()
        watches.append(LoadWatch().__enter__())
        return (StepClock(cell.batches(staged), device),), {}

    def block(clock):
        times, loss = run_block(cell, clock)
        m.blocks.append(times)
        reported.append(loss)

    benchmark.pedantic(block, setup=setup, rounds=s.repeats, warmup_rounds=warmup_rounds, iterations=1)
    stop_watch()
    warm = len(m.blocks) - s.repeats  # the warm-up rounds' blocks (none where pytest-benchmark is disabled)
    if warm > 0:
        del m.blocks[:warm], reported[:warm], m.block_load[:warm]
    for i, loss in enumerate(reported, 1):  # read back after timing: no sync inside a round
        if not runner._finite(loss):
            m.fault("diverged", f"non-finite loss in block {i}")
            break


def alone_record(spec, m, seed: int) -> dict:
    """The record of a cell timed on its own (a test's blocks are never interleaved with its baseline's):
    `reports.results.record` without `block_medians_s`. `loopmark compare` divides each block by the baseline's block
    of the same round, which only `loopmark run` times; without them it gates such a cell on its deterministic
    metrics and memory, and says that time was not compared (between two runs of unchanged code here, the baseline's
    blocks timed minutes apart from a variant's put 18 of 46 cells "slower" by 16-48 %)."""
    from reports import results

    record = results.record(spec, m, seed)
    record["block_medians_s"] = None
    return record


def _time_own(scratch: Path, workload, variant, device, s, staged, spec, m) -> None:
    """`loopmark run`'s own timing pass (`Runner._time`: a fresh cell, its warm-up, `repeats` blocks) on this one
    cell; `m` is filled in place, and nothing is written to the runner's directory."""
    from bench.runner import Runner

    class OneCell(Runner):
        def save(self, spec, m):  # the fixture's session writes the cell (--loopmark-out)
            pass

    timer = OneCell(scratch, s, progress=lambda record: None, status=lambda text: None)
    try:
        timer._time(workload, device, [variant], staged, {variant.name: (spec, m)})
    finally:
        timer.close()


# -- results --------------------------------------------------------------------------------------------------

class LoopmarkResult:
    """One measured cell: every results.csv column as an attribute (`syncs_per_step`, `verdict`,
    `step_time_median_s`, `peak_memory_bytes`, ...; None where not measured), results.json's raw fields too
    (`sync_sites`, `step_times_s`, `block_medians_s`, ...), and `record`, the dict `loopmark run` writes."""

    def __init__(self, record: dict):
        self.record = record

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "record":
            raise AttributeError(name)
        from reports.results import CSV_COLUMNS, RAW_FIELDS

        if name in self.record:
            return self.record[name]
        if name in CSV_COLUMNS or name in RAW_FIELDS:
            return None
        raise AttributeError(f"{type(self).__name__} has no field {name!r} (the results.csv columns are its fields)")

    def __dir__(self):
        from reports.results import CSV_COLUMNS, RAW_FIELDS

        return sorted({*super().__dir__(), *CSV_COLUMNS, *RAW_FIELDS, *self.record})

    def __repr__(self) -> str:
        return (f"<LoopmarkResult {_cell_name(self)}: status={self.status} verdict={self.verdict} "
                f"syncs_per_step={self.syncs_per_step} step_time_median_s={self.step_time_median_s}>")


def _cell_name(result) -> str:
    return f"{result.variant} on {result.workload} ({result.device})"


def assert_no_new_syncs(result: LoopmarkResult, max_per_step: float = 0) -> None:
    """Fail unless the loop makes at most `max_per_step` host-device syncs per step; the message names every site
    (file:line, syncs per step, the source line)."""
    __tracebackhide__ = True
    syncs = result.syncs_per_step
    if syncs is None:
        raise AssertionError(f"{_cell_name(result)}: no sync count (status {result.status}: {result.error})")
    if syncs <= max_per_step + 1e-9:
        return
    steps = result.steps or 1
    lines = [f"{_cell_name(result)}: {syncs:g} host-device syncs per step, more than the {max_per_step:g} "
             f"allowed. Where (syncs per step):"]
    sites = sorted((result.sync_sites or {}).items(), key=lambda kv: -kv[1])
    code = {d.get("site"): site_code(d) for d in result.record.get("sync_site_details") or [] if isinstance(d, dict)}
    for site, count in sites:
        source = code.get(site, "")
        lines.append(f"  {site}  {count / steps:g}" + (f"  {source}" if source else ""))
    kinds = result.record.get("sync_kinds") or {}
    if kinds:
        lines.append("  by operator: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
                     + f" over {steps} steps")
    raise AssertionError("\n".join(lines))


def assert_correct(result: LoopmarkResult, verdict=None) -> None:
    """Fail unless the cell finished ok and its verdict says the loop is correct: `identical`, `equivalent` or
    `different` (each step used its own batch's gradient) and, for a built-in, the verdict it declares. `verdict`
    (a verdict or a list of them) asks for that one instead; `identical` meets `equivalent`."""
    __tracebackhide__ = True
    from reports.results import verdict_matches

    problems = []
    if result.status != "ok":
        problems.append(f"status {result.status}" + (f": {result.error}" if result.error else ""))
    reason = f": {result.verdict_reason}" if result.verdict_reason else ""
    if verdict is not None:
        wanted = (verdict,) if isinstance(verdict, str) else tuple(verdict)
        if not any(verdict_matches(result.verdict, w) for w in wanted):
            problems.append(f"verdict {result.verdict}, expected {' or '.join(wanted)}{reason}")
    elif result.verdict not in CORRECT:
        problems.append(f"verdict {result.verdict}{reason}")
    elif result.verdict_as_expected is False:
        problems.append(f"verdict {result.verdict}, declared {result.expected_verdict}{reason}")
    if problems:
        raise AssertionError(f"{_cell_name(result)}: " + "; ".join(problems))


def _check_marker(item, marker) -> None:
    __tracebackhide__ = True
    unknown = sorted(set(marker.kwargs) - set(MARKER_ARGS))
    if marker.args or unknown:
        pytest.fail(f"@pytest.mark.loopmark takes {' and '.join(a + '=' for a in MARKER_ARGS)} only"
                    + (f", not {', '.join(unknown)}" if unknown else ""), pytrace=False)
    fixture = getattr(item, "funcargs", {}).get("loopmark")
    if not isinstance(fixture, Loopmark) or not fixture.results:
        pytest.fail("@pytest.mark.loopmark: the test measured nothing with the `loopmark` fixture", pytrace=False)
    most, verdict = marker.kwargs.get("max_syncs_per_step"), marker.kwargs.get("verdict")
    failures = []
    for result in fixture.results:
        for check, wanted in ((assert_no_new_syncs, most), (assert_correct, verdict)):
            if wanted is None:
                continue
            try:
                check(result, wanted)
            except AssertionError as exc:
                failures.append(str(exc))
    if failures:
        pytest.fail("@pytest.mark.loopmark: " + "\n".join(failures), pytrace=False)


# -- the session ----------------------------------------------------------------------------------------------

class _Session:
    """What the tests of one session share: the workloads they built (with the correctness pass's cache of each
    workload's baseline), the cells measured so far, and where they are written (--loopmark-out)."""

    def __init__(self, config, out: str | None):
        self.config, self.out = config, out
        self.records: dict[tuple, dict] = {}
        self.tests: dict[tuple, str] = {}  # cell -> the test that measured it
        self.env: dict | None = None
        self._workloads: dict = {}
        self._scratch: Path | None = None

    def settings(self, **given):
        from bench.runner import Settings

        values = {**DEFAULTS, "steps": self.config.getoption("loopmark_steps") or DEFAULTS["steps"]}
        values.update({k: v for k, v in given.items() if v is not None})
        for name, least in (("steps", 3), ("repeats", 1), ("warmup", 0), ("memory_steps", 1), ("check_steps", 1)):
            value = values.get(name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"loopmark.measure: {name}={value!r}, expected a whole number >= {least}")
        return Settings(**values)

    def workload(self, workload):
        """(Workload, correctness cache) for a workload function, a Workload or a name; built once per session."""
        from loops import Workload, resolve_workload

        if isinstance(workload, (str, Workload)) or callable(workload):
            key = id(workload) if isinstance(workload, Workload) else workload
        else:
            raise TypeError(f"workload: a function returning a loops.Workload, a Workload or a name, not "
                            f"{type(workload).__name__}")
        if key not in self._workloads:
            if isinstance(workload, str):
                built = resolve_workload(workload)
            elif isinstance(workload, Workload):
                built = workload
            else:
                built = workload()
                if not isinstance(built, Workload):
                    raise TypeError(f"workload {getattr(workload, '__name__', workload)!r} returned "
                                    f"{type(built).__name__}, not loops.Workload")
            self._workloads[key] = built, {}, workload  # the object itself kept: its id stays its own
        return self._workloads[key][:2]

    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="loopmark-"))
        return self._scratch

    def environment(self) -> dict:
        if self.env is None:
            from bench.env import environment

            self.env = environment()
            self.env["command"] = " ".join(["pytest", *map(str, self.config.invocation_params.args)])
        return self.env

    def add(self, record: dict, nodeid: str) -> None:
        from reports import results

        key = results.cell_key(record)
        if key in self.tests and self.tests[key] != nodeid:
            warnings.warn(f"loopmark: {'/'.join(key)} measured by {self.tests[key]} and again by {nodeid}; the "
                          "session's results keep the last", pytest.PytestWarning, stacklevel=2)
        self.records[key], self.tests[key] = record, nodeid
        results.derive(list(self.records.values()))  # ratios to a baseline measured in the same session
        if self.out and not hasattr(self.config, "workerinput"):  # xdist: the controller writes
            results.write_results(Path(self.out), self.environment(), list(self.records.values()))
