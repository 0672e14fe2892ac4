"""The ranks of `--nproc-per-node N` on this machine, started as `torchrun --standalone` starts them, but forked from
one process that has imported torch once.

`python -m bench.launcher N ARGS...` runs `python -m bench ARGS...` as N ranks. Each rank's environment is what
torchrun gives a rank of a one-node job (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
`MASTER_PORT`, `TORCHELASTIC_RUN_ID`, ...), so a script, a library (Lightning, Accelerate) and loopmark's own ranks
see a torchrun job. What differs is the cost: torchrun is a process that imports torch, and each rank imports torch
again and, on its first optimizer, torch's compiler front end (`torch._dynamo`), about 3.5 s of CPU per process on a
small machine before any step. Here the launcher imports them once, before it starts any thread, and each rank is a
fork of it. Nothing else is shared: no rank exists before the fork, no tensor has been made, no device touched.

As torchrun does, when a rank fails (a non-zero exit, a signal) the others are ended (SIGTERM, then SIGKILL), the
first failure is reported as torchrun's summary reports it (`Root Cause ... rank: R ... exitcode: C`, which
`bench.distributed` reads), and the launcher exits 1. Several nodes (`--nnodes`, `--rdzv-*`) stay torchrun's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

# what the ranks import anyway, imported once here before the fork
PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "bench.cli", "bench.runner", "bench.trace")
# after a rank fails, how long the others get to end by themselves before SIGTERM: a rank whose peer is gone sees its
# collective fail at once, and a traced rank then publishes what it measured (torchrun's agent, polling, gives as much)
SETTLE_S = 2.0
GRACE_S = 10.0  # how long ended ranks get between SIGTERM and SIGKILL
# the launcher's own lines: `bench.distributed` keeps them from the user's screen, as it keeps torchrun's
PREFIX = "loopmark-launcher: "


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
    import runpy

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.update(rank_env(rank, nproc, port))
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py"), *args]
    code = 0
    try:
        runpy.run_module("bench", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except BaseException:  # as an uncaught exception ends `python -m bench`: its traceback, exit status 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own shutdown: atexit handlers and flushed streams, as a process ending runs


def launch(nproc: int, args: list[str]) -> int:
    """Start `nproc` ranks of `python -m bench ARGS` and wait for them; 0 when every rank exits 0, else 1 once the
    others are ended, the first failure reported."""
    import importlib

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
            _end(left)
    if first is None:
        return 0
    rank, code, pid = first
    print(f"{PREFIX}Root Cause (first observed failure): rank: {rank} (local_rank: {rank}) exitcode: {code} "
          f"(pid: {pid})", file=sys.stderr, flush=True)
    return 1


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _end(left: dict[int, int]) -> None:
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m bench.launcher N ARGS...: N ranks of `python -m bench ARGS...`", file=sys.stderr)
        return 2
    return launch(int(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- independent work shared out among forked workers
def fork_safe() -> bool:
    """Whether this process may fork workers: a single thread (a fork copies only the calling thread, and a lock another
    thread held stays held in the copy) and no CUDA context made (a forked child cannot use it)."""
    import threading

    import torch

    return (hasattr(os, "fork") and threading.active_count() == 1
            and not (torch.cuda.is_available() and torch.cuda.is_initialized()))


def _worker_threads(threads: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to take: it ends the workers
    torch.set_num_threads(threads)


def forked_map(func, items: list, jobs: int, threads: int):
    """`func(item)` for each of `items`, in `jobs` processes forked from this one (each with `threads` intra-op
    threads), yielded in the order of `items` as each is ready. Raises `BrokenProcessPool` at the first item whose
    worker died (the caller runs it, and those after it, itself)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sys.stdout.flush()
    sys.stderr.flush()
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker_threads,
                               initargs=(threads,))
    try:
        futures = [pool.submit(func, item) for item in items]
        for future in futures:
            yield future.result()
    except BaseException:  # an interrupt, a worker that died, the caller done early: no worker goes on
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
