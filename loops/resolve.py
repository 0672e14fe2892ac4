"""Resolve names: a user's object named `package.module:function`, and the one line for a name that is not there."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable


class BadName(ValueError):
    """A name that does not resolve; its message is one line that says what is valid."""


def unknown_name(what: str, name: str, names: Iterable[str], valid: str) -> BadName:
    """The error for `name`, not one of `names`: the closest of them as `did you mean` (a typo), else what is
    `valid`."""
    close = difflib.get_close_matches(name, list(names), n=1)
    if close:
        return BadName(f"unknown {what} {name!r}; did you mean {close[0]!r}?")
    return BadName(f"unknown {what} {name!r}; valid: {valid}")


def load_object(spec: str, what: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadName(f"{what} {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing the user's module
        raise BadName(f"{what} {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise BadName(f"{what} {spec!r}: {module_name!r} has no callable {attr!r}")
    return obj
