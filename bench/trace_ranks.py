"""The ranks of a script traced under torchrun (`loopmark trace --nproc-per-node N`, or a torchrun of the user's own).

Each rank traces its own process (`bench.trace`); each puts its record in a directory the ranks share (`publish`: the
launching `loopmark trace --nproc-per-node`, `bench.launcher.launch_trace`, names it; under a torchrun of the
user's own, a directory of the machine's temporary directory named after torchrun's run id and port), and rank 0
writes them, one cell per rank (`collect`). When one rank fails, the others fail in the collective that waited for it:
`first_failure` names the rank whose own failure ended the trace.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import tempfile
import time
from pathlib import Path

from bench import launcher
from reports.table import format_table
from reports.units import human_bytes

RANKS_DIR_ENV = "LOOPMARK_TRACE_RANKS_DIR"
RANKS_WAIT_S = 120.0  # how long rank 0 waits for the other ranks' records once its own trace has ended


def ranks_dir() -> Path:
    where = os.environ.get(RANKS_DIR_ENV)
    if where:
        return Path(where)
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.environ.get('MASTER_PORT', '')}"
    return Path(tempfile.gettempdir()) / f"loopmark-trace-{''.join(c for c in run if c.isalnum() or c in '-_')}"


def publish_written(exit_code: int) -> None:
    """Rank 0 wrote every rank's cell, and exits with `exit_code`: what the launching `loopmark trace` exits with."""
    if os.environ.get(RANKS_DIR_ENV):
        (ranks_dir() / "written.json").write_text(json.dumps({"exit_code": exit_code}))
    else:  # a torchrun of the user's own: nothing is left in the temporary directory
        with contextlib.suppress(OSError):
            ranks_dir().rmdir()


def unpublish(rank: int) -> None:
    """Before this rank's trace: no record of an earlier run of the same run id and port is left for rank 0 to read."""
    with contextlib.suppress(OSError):
        (ranks_dir() / f"rank{rank}.json").unlink()


def publish(record: dict, exit_code: int) -> None:
    """This rank's record and exit code, where rank 0 (or the launcher) reads them."""
    where = ranks_dir()
    rank = record.get("rank", 0)
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f".rank{rank}.tmp"
    tmp.write_text(json.dumps({"record": record, "exit_code": exit_code}, default=str))
    os.replace(tmp, where / f"rank{rank}.json")


def collect(ranks: int, wait_s: float = 0.0, where: Path | None = None) -> dict[int, dict]:
    """The ranks' published {"record", "exit_code"}, by rank, waiting up to `wait_s` for every rank's."""
    deadline, where = time.monotonic() + wait_s, where or ranks_dir()
    while True:
        found = {}
        for rank in range(ranks):
            with contextlib.suppress(OSError, ValueError):
                found[rank] = json.loads((where / f"rank{rank}.json").read_text())
        if len(found) == ranks or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def clear_ranks() -> None:
    """The published records, once written to the results (a later run with the same id starts clean)."""
    for path in ranks_dir().glob("rank*.json"):
        path.unlink(missing_ok=True)


def ranks_table(records: list[dict]) -> str:
    """One line per rank of a traced script under torchrun: its figures side by side."""
    def number(r, key, spec=".3g"):
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"
    rows = [[str(r.get("rank")), number(r, "syncs_per_step"), number(r, "collectives_per_step"),
             human_bytes(r["comm_bytes_per_step"]) if isinstance(r.get("comm_bytes_per_step"), (int, float)) else "-",
             str(r.get("verdict") or "-"), str(r.get("status")), str(r.get("error") or "")[:100]] for r in records]
    return format_table(["rank", "syncs/step", "collectives/step", "sent/step", "verdict", "status", "error"], rows,
                        right=[1, 2, 3])


def collective_timeout(args: tuple, kwargs: dict) -> dict:
    """`init_process_group`'s keyword arguments with its `timeout` at most the launcher's --cell-timeout (where it set
    one): a collective that waits for a rank that will never join it raises then, and the rank's trace ends with what
    it measured. `args` are those after the backend (`init_method`, then `timeout`)."""
    limit = os.environ.get(launcher.TIMEOUT_ENV)
    if not limit or len(args) >= 2:
        return kwargs
    cap = datetime.timedelta(seconds=float(limit))
    given = kwargs.get("timeout")
    return {**kwargs, "timeout": min(given, cap) if isinstance(given, datetime.timedelta) else cap}


# what a rank's collective raises when another rank has ended or stopped answering (gloo's and nccl's words)
PEER_FAILURES = ("remote worker", "closed by peer", "reset by peer", "Timed out waiting", "remote process",
                 "collective operation timeout", "communicator was aborted")


def first_failure(records: list[dict]) -> str | None:
    """One line naming the rank whose own failure ended a trace under torchrun (the other ranks' collectives then
    fail, and say so in gloo's or nccl's words), with where in the script it stopped; None when no rank failed of
    itself."""
    own = [r for r in records if r.get("status") == "error" and not any(
        w in str(r.get("error")) for w in PEER_FAILURES)]
    if not own:
        return None
    r = min(own, key=lambda r: r.get("rank", 0))
    site = f" ({r['error_site']})" if r.get("error_site") else ""
    others = [x.get("rank") for x in records if x is not r and x.get("status") == "error"]
    tail = (f"; rank(s) {', '.join(map(str, others))} ended in the collective that waited for it"
            if others and len(own) == 1 else "")
    return f"rank {r.get('rank')} failed: {r.get('error')}{site}{tail}"
