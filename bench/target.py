"""What `loopmark trace` runs: a script (`python SCRIPT ARGS`) or a module (`python -m MODULE ARGS`), checked before
anything else is imported, so that a wrong path is one line at once (and the launching `loopmark trace
--nproc-per-node N` checks it without importing torch)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class BadTarget(ValueError):
    """No script to trace: no such file or module, a syntax error. One line."""


@dataclass(frozen=True)
class Target:
    name: str  # the cell's workload: the script's file name, or the module's name
    argv: tuple  # the script's sys.argv; argv[0] as `python` would set it
    path: str | None = None  # the script, absolute
    module: str | None = None

    @property
    def command(self) -> str:
        shown = [f"-m {self.module}"] if self.module else [self.argv[0]]
        return " ".join(["python", *shown, *self.argv[1:]])


def script_target(script: str, args=()) -> Target:
    """A script to run as `python SCRIPT ARGS`; BadTarget (one line) if it does not exist or does not compile."""
    path = Path(script)
    if not path.exists():
        raise BadTarget(f"{script}: no such file")
    if path.is_dir():
        raise BadTarget(f"{script}: is a directory (give the script, or -m for a package)")
    try:
        compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as exc:
        raise BadTarget(f"{script}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except (OSError, ValueError) as exc:
        raise BadTarget(f"{script}: cannot read it ({exc})") from None
    return Target(name=path.name, argv=(script, *args), path=str(path.resolve()))


def module_target(name: str, args=()) -> Target:
    """A module to run as `python -m MODULE ARGS` (a package runs its `__main__`); BadTarget if it is not found or
    does not compile. Finding it imports its parent packages, as `python -m` does."""
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(f"{name}.__main__")
            if spec is None:
                raise BadTarget(f"-m {name}: a package without a __main__ module")
        if spec is None or spec.loader is None:
            raise BadTarget(f"-m {name}: no module named {name!r}")
        code = spec.loader.get_code(spec.name)
    except BadTarget:
        raise
    except SyntaxError as exc:
        raise BadTarget(f"-m {name}: syntax error in {exc.filename} at line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # ModuleNotFoundError for a parent, or a parent package's __init__ that raises
        raise BadTarget(f"-m {name}: {type(exc).__name__}: {exc}".split("\n")[0]) from None
    if code is None:
        raise BadTarget(f"-m {name}: no code to run")
    return Target(name=name, argv=(spec.origin or name, *args), module=name)
