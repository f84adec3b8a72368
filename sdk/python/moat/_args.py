"""Checks of caller arguments, so a bad value fails here with a clear message instead of
reaching the server (or, worse, being silently ignored)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "command",
    "count",
    "mapping",
    "one_of",
    "optional_str",
    "seconds",
    "states",
    "str_list",
    "user",
]


def seconds(name: str, value: float | None, *, maximum: int | None = None) -> int | None:
    """``value`` (seconds, fractions rounded up) as the whole seconds the API takes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value}")
    whole = math.ceil(value)
    if maximum is not None and whole > maximum:
        raise ValueError(f"{name} must be at most {maximum} seconds, not {value}")
    return whole


def count(
    name: str, value: int | None, *, minimum: int = 1, maximum: int | None = None
) -> int | None:
    """An optional whole number within bounds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, not {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, not {value}")
    return value


def optional_str(name: str, value: str | None, *, empty_ok: bool = False) -> str | None:
    """An optional string argument."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if not value and not empty_ok:
        raise ValueError(f"{name} must not be empty")
    return value


def user(value: str | None) -> str | None:
    """The sandbox user a call acts as: ``user`` or ``root``."""
    if value is None:
        return None
    if value not in ("user", "root"):
        raise ValueError(f"user must be 'user' or 'root', not {value!r}")
    return value


def command(cmd: str | Sequence[str]) -> tuple[str, Any]:
    """``("shell", script)`` for a string, ``("cmd", argv)`` for a sequence of strings."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ValueError("the command is empty")
        return "shell", cmd
    if isinstance(cmd, (bytes, bytearray)) or not isinstance(cmd, Sequence):
        raise TypeError("the command must be a shell script (str) or an argv (a sequence of str)")
    argv = list(cmd)
    if not argv:
        raise ValueError("the command's argv is empty")
    if not all(isinstance(a, str) for a in argv):
        raise TypeError("every element of the command's argv must be a str")
    return "cmd", argv


def one_of(**given: Any) -> str:
    """The name of the one argument of ``given`` that is not ``None``."""
    named = [k for k, v in given.items() if v is not None]
    if len(named) != 1:
        names = ", ".join(given)
        raise ValueError(
            f"give exactly one of {names}" + (f" (got {', '.join(named)})" if named else "")
        )
    return named[0]


def str_list(name: str, value: Sequence[str] | None) -> list[str]:
    """A list of strings (not a lone string, which would be read letter by letter)."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of strings")
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"every element of {name} must be a non-empty string")
    return list(value)


def states(name: str, value: str | Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    """One state or several, each one of ``allowed``."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for s in items:
        if s not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; {s!r} is not")
    return items


def mapping(name: str, value: Mapping[str, str] | None) -> dict[str, str]:
    """A string-to-string mapping from the caller, checked (``None`` is empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be a mapping of strings to strings, not {type(value).__name__}"
        )
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{name} must map strings to strings; {k!r}: {v!r} is not")
        out[k] = v
    return out
