"""Starting the ranks of `loopmark run|check|trace --nproc-per-node N`, watching them, and naming the one that failed;
torch-free, so that the launching command imports no torch its ranks will import anyway.

The ranks of one machine are started as `torchrun --standalone` starts them, but forked from one process that has
imported torch once: `python -m bench.launcher N ARGS...` runs `python -m bench ARGS...` as N ranks. Each rank's
environment is what torchrun gives a rank of a one-node job (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_RUN_ID`, ...), so a script, a library (Lightning,
Accelerate) and loopmark's own ranks see a torchrun job. What differs is the cost: torchrun is a process that imports
torch, and each rank imports torch again and, on its first optimizer, torch's compiler front end (`torch._dynamo`),
about 3.5 s of CPU per process on a small machine before any step. Here the launcher imports them once, before it
starts any thread, and each rank is a fork of it. Nothing else is shared: no rank exists before the fork, no tensor
has been made, no device touched. Several nodes (`--nnodes`, `--rdzv-*`), and a machine with an NVIDIA GPU, get
torchrun itself (`ranks_command`). Where the launching process has imported torch already (`loopmark run` and `check`
do; so does a Python program or a test session calling `bench.cli.main`) and its ranks run one intra-op thread each,
the launcher is itself a fork of that process (`_Forked`) rather than `python -m bench.launcher`: no import at all.
Its ranks then hold a copy of whatever that process held (modules, objects), but no thread of it and no CUDA context
(`fork_safe`), and none of the cleanup it registered for its own exit.

As torchrun does, when a rank fails (a non-zero exit, a signal) the others are ended (SIGTERM, then SIGKILL), the
first failure is reported as torchrun's summary reports it (`Root Cause ... rank: R ... exitcode: C`, read by
`_root_cause` whichever started the ranks), and the launcher exits 1. While the ranks run, `_one_torchrun` watches
their heartbeats (`bench.distributed.heartbeat`) and ends them all when none progresses (`launcher_limit`).

`forked_map` shares independent work (the cells of `loopmark check --jobs N`) out among processes forked the same
way."""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib
import importlib.util
import itertools
import json
import locale
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from pathlib import Path

# what the ranks import anyway, imported once here before the fork: torch, its compiler front end (a rank's first
# optimizer imports it), the commands, and what each rank's figures need (scipy.stats, for their intervals)
PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "bench.cli", "bench.runner", "bench.trace",
           "reports.report", "reports.findings", "scipy.stats")
# after a rank fails, how long the others get to end by themselves before SIGTERM: a rank whose peer is gone sees its
# collective fail at once, and a traced rank then publishes what it measured (torchrun's agent, polling, gives as much)
SETTLE_S = 2.0
GRACE_S = 10.0  # how long ended ranks get between SIGTERM and SIGKILL
STACKS_S = 1.0  # how long the ranks of a hung cell get to dump their stacks (SIGUSR1)
# the launcher's own lines: kept from the user's screen (`_forward`), as torchrun's are
PREFIX = "loopmark-launcher: "

# set by the launcher in its ranks' environment: where the ranks report which cell and pass they are in
# (`bench.distributed.heartbeat`), so that it can name the cell and the rank of a crash or a hang
HEARTBEAT_ENV = "LOOPMARK_HEARTBEAT_DIR"
# set by the launching `loopmark trace`: its --cell-timeout, the longest a traced script's collective may wait
TIMEOUT_ENV = "LOOPMARK_CELL_TIMEOUT"
# set by the launcher: the command the user typed, which the ranks' results record as the run's command
COMMAND_ENV = "LOOPMARK_COMMAND"


def launched() -> bool:
    """Whether a launcher (torchrun, or this module's) started this process as a rank: its environment names the rank
    and the rendezvous."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_rank() -> tuple[int, int]:
    """(rank, ranks) of this process as its launcher started it; (0, 1) outside one."""
    if not launched():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _torch_dir() -> str:
    """Where torch is installed, found without importing it (a frame there is torch's own)."""

    spec = importlib.util.find_spec("torch")
    return (list(spec.submodule_search_locations or []) or [""])[0] if spec else ""


def free_port() -> int:
    """A TCP port free on the loopback interface now, for rank 0's store (`--standalone` picks one the same way)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """What torchrun puts in the environment of rank `rank` of a one-node job of `nproc` ranks."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": f"loopmark-{os.getpid()}-{port}", "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }


def _rank(rank: int, nproc: int, port: int, args: list[str]) -> None:
    """In the forked child: become rank `rank` and run `python -m bench ARGS`; never returns."""

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.update(rank_env(rank, nproc, port))
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py"), *args]
    code = 0
    try:  # by its path: a host that imported `bench` through a loader of its own (pytest's) cannot give its code
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except BaseException:  # as an uncaught exception ends `python -m bench`: its traceback, exit status 1

        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own shutdown: atexit handlers and flushed streams, as a process ending runs


def start_ranks(nproc: int, args: list[str]) -> int:
    """Start `nproc` ranks of `python -m bench ARGS` and wait for them; 0 when every rank exits 0, else 1 once the
    others are ended, the first failure reported."""

    for name in PRELOAD:
        importlib.import_module(name)
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    pids: dict[int, int] = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            _rank(rank, nproc, port, args)
        pids[pid] = rank

    def forward(signum, frame):  # a signal to the launcher alone reaches its ranks, as torchrun passes it on
        for pid in pids:
            _signal(pid, signum)
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    first = None
    left = dict(pids)
    while left:
        pid, status = os.wait()
        rank = left.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and first is None:
            first = rank, code, pid
            _end_ranks(left)
    if first is None:
        return 0
    rank, code, pid = first
    print(f"{PREFIX}Root Cause (first observed failure): rank: {rank} (local_rank: {rank}) exitcode: {code} "
          f"(pid: {pid})", file=sys.stderr, flush=True)
    return 1


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _end_ranks(left: dict[int, int]) -> None:
    """End the ranks still running once a rank failed: SETTLE_S to end by themselves, then SIGTERM, then SIGKILL to
    any left after GRACE_S; reaps them."""
    _reap(left, SETTLE_S)
    for pid in left:
        _signal(pid, signal.SIGTERM)
    _reap(left, GRACE_S)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    _reap(left, None)


def _reap(left: dict[int, int], within: float | None) -> None:
    """Reap the ranks in `left` that end within `within` seconds (None: all of them, however long)."""
    deadline = None if within is None else time.monotonic() + within
    while left and (deadline is None or time.monotonic() < deadline):
        pid, _ = os.waitpid(-1, 0 if deadline is None else os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        left.pop(pid, None)


class _Forked:
    """`python -m bench.launcher N ARGS` started as a fork of this process, which imported torch already, rather than
    as a new interpreter that imports it again: what `subprocess.Popen(cmd, stdout=PIPE, stderr=STDOUT, text=True,
    env=env, start_new_session=True)` gives (`pid`, `stdout`, `poll`, `wait`, `returncode`), less the imports.

    The child is the launcher of a process of its own: a session of its own, its output the pipe, `env` its
    environment, the working directory first on its import path (as `python -m` puts it), Ctrl-C and SIGTERM as a new
    interpreter has them, one intra-op thread. Cleanup this process registered for its own exit (a temporary
    directory's finalizer) is not run by the child or its ranks. The launcher ends with `os._exit`; a rank ends as an
    interpreter does (`_exit_rank`): neither ever returns into the code this process forked from."""

    def __init__(self, nproc: int, args: list[str], env: dict):
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            _forked_launcher(write, nproc, args, env)
        os.close(write)
        self.stdout = open(read, encoding=locale.getpreferredencoding(False), errors="replace")  # noqa: SIM115
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(["bench.launcher"], timeout)
            time.sleep(0.02)
        return self.returncode


def _forked_launcher(write: int, nproc: int, args: list[str], env: dict) -> None:
    """In the child of `_Forked`: be the launcher of `nproc` ranks; never returns."""

    launcher, code = os.getpid(), 1
    try:
        os.setsid()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for path in [os.getcwd(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))][::-1]:
            if path not in sys.path:
                sys.path.insert(0, path)
        for finalizer in list(getattr(weakref.finalize, "_registry", {})):
            finalizer.atexit = False  # this process's to run at its exit, not its copies'
        import torch

        torch.set_num_threads(1)
        code = start_ranks(nproc, args)
    except SystemExit as done:  # a rank's end (its `sys.exit`), or the launcher's
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        if os.getpid() != launcher:
            _exit_rank(code)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _exit_rank(code: int) -> None:
    """End a rank forked from a launcher that was itself forked (`_Forked`) as the interpreter ends a process: its
    threads joined, its atexit handlers run (a traced script's included), its streams flushed; never returns."""

    try:
        with contextlib.suppress(AttributeError):
            threading._shutdown()  # the non-daemon threads, as at the end of a process
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _start(cmd: list[str], env: dict):
    """Start the ranks' launcher `cmd` in a session of its own, its stdout and stderr one pipe: forked from this process
    (`_Forked`) where that can be done (`_forkable`), else as the command."""

    if _forkable(cmd, env):
        return _Forked(int(cmd[3]), cmd[4:], env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _forkable(cmd: list[str], env: dict) -> bool:
    """Whether `cmd`, loopmark's launcher, can be a fork of this process: torch imported here already (otherwise the
    command imports it as fast), a process that can fork (`fork_safe`), and ranks of one intra-op thread each. A child
    forked after this process ran a parallel region of OpenMP hangs at its own first one; with one thread it has
    none."""

    return (cmd[1:3] == ["-m", "bench.launcher"] and "torch" in sys.modules and env.get("OMP_NUM_THREADS") == "1"
            and fork_safe())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m bench.launcher N ARGS...: N ranks of `python -m bench ARGS...`", file=sys.stderr)
        return 2
    return start_ranks(int(argv[0]), argv[1:])



# ---------------------------------------------------------------- independent work shared out among forked workers
def fork_safe() -> bool:
    """Whether this process may fork workers: a single thread (a fork copies only the calling thread, and a lock another
    thread held stays held in the copy) and no CUDA context made (a forked child cannot use it)."""

    import torch

    return hasattr(os, "fork") and threading.active_count() == 1 and not torch.cuda.is_initialized()


def _worker_threads(threads: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to take: it ends the workers
    torch.set_num_threads(threads)


def forked_map(func, items: list, jobs: int, threads: int, first=None):
    """`func(item)` for each of `items`, in `jobs` processes forked from this one (each with `threads` intra-op
    threads), yielded in the order of `items` as each is ready; the items for which `first(item)` is true are handed
    out first (the longest, so that the short ones fill the end). Raises `BrokenProcessPool` at the first item whose
    worker died (the caller runs it, and those after it, itself)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sys.stdout.flush()
    sys.stderr.flush()
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker_threads,
                               initargs=(threads,))
    try:
        order = sorted(range(len(items)), key=lambda i: not first(items[i])) if first else range(len(items))
        futures = dict.fromkeys(range(len(items)))
        for i in order:
            futures[i] = pool.submit(func, items[i])
        for future in futures.values():
            yield future.result()
    except BaseException:  # an interrupt, a worker that died, the caller done early: no worker goes on
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


# ---------------------------------------------------------------- launching `run`, `check` and `trace` with N ranks
# c10d's flight recorder keeps its last 2000 collectives in a ring buffer: about 1.5 MiB of C heap that grows a few
# hundred bytes a step until it is full, which the memory pass would report as the loop's growth. The launcher turns
# it off unless the environment sets it; results.json's environment says which (`flight_recorder`).
FLIGHT_RECORDER_ENV = "TORCH_FR_BUFFER_SIZE"


def quiet_ranks_env(nproc: int, threads: int | None = None) -> dict:
    """The ranks' environment: the cores shared out among them (OMP_NUM_THREADS), the flight recorder off unless set,
    and the command the user typed (what results.json records as the run's command)."""

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault(FLIGHT_RECORDER_ENV, "0")
    env.setdefault(COMMAND_ENV, " ".join(["loopmark", *sys.argv[1:]]))  # what the user typed, for the results
    return env


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _root_cause(log: str) -> tuple[int, str] | None:
    """(rank, how it ended) of the first failure torchrun's summary names."""

    found = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", log, re.S)
    return (int(found.group(1)), _signal_name(int(found.group(2)))) if found else None


def _read_json(path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


class _Ranks:
    """What the ranks of one torchrun reported in its heartbeat directory."""

    def __init__(self, where):
        self.where = where

    def clear(self) -> None:
        for path in self.where.glob("*.json"):
            path.unlink(missing_ok=True)

    def beats(self) -> list[dict]:
        return [d for d in map(_read_json, sorted(self.where.glob("rank*.json"))) if d]

    def faults(self) -> list[dict]:
        return sorted((d for d in map(_read_json, self.where.glob("fault*.json")) if d), key=lambda d: d["rank"])


def _forward(stream, log: list, echo) -> None:
    """Copy the ranks' output to `echo`, line by line, and keep all of it in `log`. torchrun's own log lines and its
    failure report are kept, not shown: the launcher says in one line what failed."""


    launcher_line = re.compile(rf"^([WEI]\d{{4}} \d\d:\d\d:\d\d|{re.escape(PREFIX)})")
    torch_rank = re.compile(r"^\[rank\d+\]:")  # torch's prefix on a rank's own warnings and tracebacks
    report = False
    for line in stream:
        log.append(line)
        report = report or line.startswith("Traceback (most recent call last)")
        if not (report or launcher_line.match(line) or torch_rank.match(line)):
            echo(line.rstrip("\n"))


def ranks_command(nproc: int, args: list[str], rendezvous: list[str] | None = None) -> list[str]:
    """The command that runs `python -m bench ARGS` as `nproc` ranks: on this machine alone and without an NVIDIA
    GPU, `bench.launcher` (the ranks of `torchrun --standalone`, forked from one process that imported torch once);
    with torchrun's rendezvous options (several nodes), or where a GPU is, torchrun itself (`--standalone`): a
    process forked after anything touched CUDA (an import that asks for the device count) cannot use CUDA."""
    if rendezvous or gpu_present():
        return [sys.executable, "-m", "torch.distributed.run", *(rendezvous or ["--standalone"]),
                f"--nproc-per-node={nproc}", "-m", "bench", *args]
    return [sys.executable, "-m", "bench.launcher", str(nproc), *args]


def gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU (its device files), found without touching CUDA."""

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def launcher_limit(cell_timeout: float | None) -> float | None:
    """How long a launcher lets its ranks go without progress: a rank stops its own cell at `cell_timeout` (an alarm,
    or for `loopmark trace` its collectives' timeout); past that by as much again (a minute at most), it is blocked
    where nothing reaches it. None: no limit."""
    return cell_timeout + min(cell_timeout, 60) if cell_timeout else None


def launch_run(child_args: list[str], out, nproc: int, device: str, cell_timeout: float, record_fault, say) -> None:
    """Run `loopmark run CHILD_ARGS` under torchrun, `nproc` ranks on this machine, until every planned cell is
    finished. A crash, a hang (no progress within the cell's time limit and as much again) or a fault of a cell ends
    the ranks, all of them and everything they started; `record_fault(cell, status, message)` records that cell, and
    the ranks start again (`--resume`) on the cells after it. `say(line)` shows the ranks' output. Returns when a
    torchrun ends well, or when its ranks reached no cell (then every cell still planned is recorded by
    `record_fault(None, ...)`). SIGTERM ends the ranks as Ctrl-C does (KeyboardInterrupt)."""

    env = quiet_ranks_env(nproc)
    limit = launcher_limit(cell_timeout)
    faulted: set = set()
    with tempfile.TemporaryDirectory(prefix="loopmark-ranks-") as where, _terminate_as_interrupt():
        ranks, env[HEARTBEAT_ENV] = _Ranks(Path(where)), where
        cmd = ranks_command(nproc, ["run", *child_args, "--device", device, "--out", str(out), "--resume"])
        while True:
            code, hung, current, log = _one_torchrun(cmd, env, ranks, limit, nproc, say)
            if code == 0 and hung is None:
                return
            cell, status, message = _what_failed(ranks, log, code, hung, current, nproc, limit)
            if cell is None or cell in faulted:  # no cell reached, or the same one again: nothing left to go on with
                record_fault(None, status, message)
                return
            faulted.add(cell)
            record_fault(cell, status, message)


def _one_torchrun(cmd: list[str], env: dict, ranks: _Ranks, limit: float | None, nproc: int, say,
                  stalled: str = "no progress in {limit:g} s (the cell's time limit and as much again, a minute at "
                                 "most)"):
    """Run one torchrun, watching its ranks' heartbeats; (exit status, what hung or None, the cell it was in, its
    output). Every process it started is ended when it returns. `stalled` begins what hung says."""

    ranks.clear()
    log: list[str] = []
    proc = _start(cmd, env)
    reader = threading.Thread(target=_forward, args=(proc.stdout, log, say), daemon=True)
    reader.start()
    hung, since, current = None, time.monotonic(), None
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            beats = ranks.beats()
            cells = [tuple(b["cell"]) for b in beats if b.get("cell")]
            now = max(cells, key=cells.count) if cells else None
            if now != current:
                current, since = now, time.monotonic()
            if limit and current and time.monotonic() - since > limit:
                hung = f"{stalled.format(limit=limit)}: {_stuck(ranks, beats, nproc)}"
                break
            late = next((f for f in ranks.faults() if f["status"] == "timeout"), None)
            if late:  # a rank ran out of time, maybe waiting for another: where is each?
                current = tuple(late["cell"])
                hung = (f"{late['error']} on rank {late['rank']}, which waited: "
                        f"{_stuck(ranks, beats, nproc, late['rank'])}")
                break
    finally:
        _end(proc)
        reader.join(timeout=5)
    return proc.returncode, hung, current, "".join(log)


def _stuck(ranks: _Ranks, beats: list[dict], nproc: int, timed_out: int | None = None) -> str:
    """Where each rank of a hung cell is, from the stacks the ranks dump on SIGUSR1: a rank stopped in code of its own
    is named as the one the others wait for (they wait inside torch, in a collective)."""

    heard = {b["rank"]: b for b in beats}
    silent = [r for r in range(nproc) if r not in heard]
    if silent:
        return f"rank {', '.join(map(str, silent))} never reported"
    stacks = {r: ranks.where / f"stack{r}.txt" for r in sorted(heard)}
    before = {r: _size(path) for r, path in stacks.items()}
    for b in heard.values():
        with contextlib.suppress(KeyError, ValueError, ProcessLookupError, PermissionError):
            os.kill(int(b["pid"]), signal.SIGUSR1)
    deadline = time.monotonic() + STACKS_S  # each dump is written at once, by the signal's own handler
    while time.monotonic() < deadline and any(_size(path) <= before[r] for r, path in stacks.items()):
        time.sleep(0.02)
    time.sleep(0.05)  # the rest of a dump begun
    where = {r: _innermost(stacks[r]) for r in stacks if r != timed_out}
    stopped = [r for r, (at, in_torch) in where.items() if in_torch is False and at]
    parts = [f"rank {r} stopped at {where[r][0]}" for r in stopped]
    parts += [f"rank {r} waiting in torch at {where[r][0]}" if where[r][0] else f"rank {r} at '{heard[r]['text']}'"
              for r in where if r not in stopped]
    return "; ".join(parts)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _innermost(path) -> tuple[str | None, bool | None]:
    """From a faulthandler dump: (the innermost frame of the main thread outside torch and loopmark's harness, whether
    the innermost frame of all is in torch); (None, None) without a dump."""

    try:
        dump = path.read_text(errors="replace")
    except OSError:
        return None, None
    blocks = re.split(r"\n\s*\n", dump.strip())
    main = next((b for b in blocks if b.startswith("Current thread")), blocks[-1] if blocks else "")
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', main)
    if not frames:
        return None, None
    return own_location(frames), frames[0][0].startswith(_torch_dir())


def own_location(frames) -> str | None:
    """`file:line in function` of the innermost of `frames` (innermost first: (file, line, function)) outside torch,
    loopmark's harness and runpy: where the user's own code is; relative to the working directory below it."""

    skip = (_torch_dir(), os.path.dirname(os.path.abspath(__file__)), runpy.__file__, "<")
    here = os.path.abspath(__file__)
    # the frames outside a rank's `_rank` are the launcher's, and a launcher forked from a host process its host's
    frames = itertools.takewhile(lambda frame: not (frame[0] == here and frame[2] == "_rank"), frames)
    own = next(((f, n, fn) for f, n, fn in frames if not f.startswith(skip)), None)
    if own is None:
        return None
    rel = os.path.relpath(own[0])
    return f"{own[0] if rel.startswith('..') else rel}:{own[1]} in {own[2]}"


def _what_failed(ranks: _Ranks, log: str, code: int, hung: str | None, current, nproc: int, limit):
    """(cell, status, message) of what ended a torchrun that did not end well."""
    if hung is not None:
        return current, "timeout", hung
    cause = _root_cause(log)
    faults = ranks.faults()
    if cause is not None and cause[0] not in {f["rank"] for f in faults}:
        faults = []  # the first rank to end reported no fault (it was killed): the others' followed from it
    if faults:
        first = faults[0]
        return tuple(first["cell"]), first["status"], f"rank {first['rank']}: {first['error']}"
    who = f"rank {cause[0]} ended ({cause[1]})" if cause else f"torchrun ended ({_signal_name(code)})"
    if current is None:
        last = next((line.strip() for line in reversed(log.splitlines())
                     if line.strip() and not line.startswith(("=", "-", " "))), "")
        return None, "error", f"the ranks reached no cell: {who}" + (f"; {last[:200]}" if last else "")
    where = next((b["text"] for b in ranks.beats() if cause and b["rank"] == cause[0]), None)
    return current, "error", who + (f" during '{where}'" if where else "")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM to the launcher ends its ranks as Ctrl-C does (they run in a session of their own, which a signal to
    the launcher's process group does not reach)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end(proc) -> None:
    """End a torchrun and every process it started (its own session): SIGTERM, then SIGKILL to whatever is left."""

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # nothing of it is left
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    proc.wait()


def launch_check(child_args: list[str], nproc: int, device: str, cell_timeout: float | None = None) -> int:
    """`loopmark check --nproc-per-node N`: the check under torchrun; rank 0 prints the verdicts. Its exit status,
    or 1 when a rank failed or hung (named in one line): a cell with no progress within `cell_timeout` and as much
    again (a minute at most) ends every rank, as under `loopmark run`."""

    env = quiet_ranks_env(nproc)
    limit = launcher_limit(cell_timeout)
    cmd = ranks_command(nproc, ["check", *child_args])
    with tempfile.TemporaryDirectory(prefix="loopmark-ranks-") as where, _terminate_as_interrupt():
        ranks, env[HEARTBEAT_ENV] = _Ranks(Path(where)), where
        code, hung, current, log = _one_torchrun(cmd, env, ranks, limit, nproc, print)
    if hung is not None:
        cell = " ".join(current[:2]) if current else "the check"
        print(f"loopmark check: timeout: {cell}: {hung}", file=sys.stderr)
        return 1
    cause = _root_cause(log)  # a rank that failed (torchrun itself then exits 1)
    if code == 0 or (code == 1 and cause is None):
        return code
    who = f"rank {cause[0]} ended ({cause[1]})" if cause else f"torchrun ended ({_signal_name(code)})"
    print(f"loopmark check: {who}", file=sys.stderr)
    return 1


def launch_trace(child_args: list[str], nproc: int, rendezvous: list[str], ranks_env: str, leftover,
                 cell_timeout: float | None = None):
    """`loopmark trace --nproc-per-node N`: `loopmark trace CHILD_ARGS` under torchrun (`--standalone` unless
    `rendezvous` holds torchrun's rendezvous options), the cores shared out among the ranks. The ranks publish their
    records in a directory named in `ranks_env`, and rank 0 writes them; if it could not (a rank failed and torchrun
    ended the others first, or they hung), `leftover(where)` writes what was published and returns its exit status
    (None: nothing was). Returns (the exit status the results were written with or None, a line naming the rank that
    failed or None).

    A hang: the ranks' collectives wait `cell_timeout` at most (the traced script's process group is given it as its
    timeout, or its own if shorter), so a rank waiting on one that never comes raises, and publishes what it measured;
    with no step on any rank for `launcher_limit(cell_timeout)`, every rank is ended and the line names where each
    one stopped."""

    env = quiet_ranks_env(nproc)
    if cell_timeout:
        env[TIMEOUT_ENV] = f"{cell_timeout:g}"
    limit = launcher_limit(cell_timeout)
    with tempfile.TemporaryDirectory(prefix="loopmark-trace-ranks-") as where, \
            tempfile.TemporaryDirectory(prefix="loopmark-ranks-") as beats, _terminate_as_interrupt():
        env[ranks_env], env[HEARTBEAT_ENV] = where, beats
        cmd = ranks_command(nproc, ["trace", *child_args], rendezvous)
        code, hung, _, log = _one_torchrun(cmd, env, _Ranks(Path(beats)), limit, nproc, print,
                                           stalled="no step on any rank in {limit:g} s (--cell-timeout and as much "
                                                   "again, a minute at most)")
        marker = _read_json(Path(where) / "written.json")
        if marker is not None and hung is None:  # rank 0 wrote every rank's cell: its exit status is the trace's
            return marker.get("exit_code"), None
        cause = _root_cause(log)
        failed = (f"timeout: {hung}" if hung is not None else
                  f"rank {cause[0]} ended ({cause[1]})" if cause else
                  f"torchrun ended ({_signal_name(code)})" if code else None)
        return leftover(Path(where)), failed


if __name__ == "__main__":
    sys.exit(main())
