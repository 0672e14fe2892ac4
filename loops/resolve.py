"""Load a user's object named `package.module:function`."""

from __future__ import annotations

import importlib


class BadName(ValueError):
    """A name that does not resolve; its message is one line that says what is valid."""


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
