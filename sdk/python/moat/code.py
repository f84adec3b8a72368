"""Stateful code execution in a sandbox (``sandbox.run_code``).

The ``/v1`` API has no route of its own for this: every sandbox's agent serves a code
interpreter on port 49999, which the server's sandbox proxy reaches on the same listener
when a request carries the ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` headers and the
sandbox's access token. Those requests carry no API key (the proxy needs none and drops it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from . import _args
from .errors import MoatError, SandboxTimeoutError
from .models import CodeContext, Execution, ExecutionError, Result, SandboxInfo

__all__ = ["ExecutionBuilder", "ResultCallback", "ErrorCallback"]

INTERPRETER_PORT = 49999

#: Called with each rich result as it comes; an async client's may be a coroutine function.
ResultCallback = Callable[[Result], Any]
#: Called with the error the code raised; an async client's may be a coroutine function.
ErrorCallback = Callable[[ExecutionError], Any]

# The interpreter sends a keepalive every 5 s of silence: a minute without one is a dead link.
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CALL_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def headers(info: SandboxInfo) -> dict[str, str]:
    """The headers that route a request to the interpreter of the sandbox ``info``."""
    if not info.access_token:
        raise MoatError(
            "this sandbox object has no access token; get one with Sandbox.connect(id)",
            code="no_access_token",
        )
    return {
        "E2b-Sandbox-Id": info.id,
        "E2b-Sandbox-Port": str(INTERPRETER_PORT),
        "X-Access-Token": info.access_token,
    }


def context_id(context: CodeContext | str | None) -> str | None:
    """The id of ``context`` (a :class:`CodeContext` or its id)."""
    if context is None or isinstance(context, CodeContext):
        return None if context is None else context.id
    return _args.optional_str("context", context)


def execute_body(
    code: str,
    language: str | None,
    context: CodeContext | str | None,
    env: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The body of ``POST /execute``."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")
    ctx = context_id(context)
    _args.optional_str("language", language)
    if ctx is not None and language is not None:
        raise ValueError("give a language or a context, not both (a context has its language)")
    return {
        "code": code,
        "context_id": ctx,
        "language": language,
        "env_vars": _args.mapping("env", env) or None,
    }


def context_body(language: str | None, cwd: str | None) -> dict[str, Any]:
    """The body of ``POST /contexts``."""
    body: dict[str, Any] = {}
    if _args.optional_str("language", language) is not None:
        body["language"] = language
    if _args.optional_str("cwd", cwd) is not None:
        body["cwd"] = cwd
    return body


class Deadline:
    """A client-side limit on how long an execution may take."""

    def __init__(self, timeout: float | None) -> None:
        _args.seconds("timeout", timeout)
        self._at = None if timeout is None else time.monotonic() + float(timeout)

    def stream_timeout(self) -> httpx.Timeout:
        """The wait for each line: short enough to notice the deadline (the interpreter sends
        keepalives every 5 s, so a longer limit is checked between lines)."""
        if self._at is None:
            return STREAM_TIMEOUT
        left = max(self._at - time.monotonic(), 0.1)
        return httpx.Timeout(min(left, STREAM_TIMEOUT.read or 60.0), connect=10.0)

    def passed(self) -> bool:
        """Whether the time is up."""
        return self._at is not None and time.monotonic() >= self._at

    def check(self) -> None:
        """Raises once the time is up."""
        if self.passed():
            raise self.error()

    @staticmethod
    def error() -> SandboxTimeoutError:
        """What running out of time raises."""
        return SandboxTimeoutError(
            "the code ran past its timeout and was interrupted", code="timed_out"
        )


class ExecutionBuilder:
    """Turns the interpreter's NDJSON lines into an :class:`Execution`, noting what callbacks
    each line calls for (the sync and async clients call them their own way)."""

    def __init__(self) -> None:
        self.execution = Execution()
        self.done = False

    def feed(self, line: str) -> tuple[str, Any] | None:
        """Takes one line; ``(kind, value)`` for a callback (``stdout``, ``stderr``,
        ``result``, ``error``), else ``None``."""
        line = line.strip()
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise MoatError(
                f"the interpreter sent a line that is not JSON: {line[:200]!r}", code="bad_answer"
            ) from e
        if not isinstance(msg, dict):
            return None
        kind = msg.get("type")
        ex = self.execution
        if kind == "number_of_executions":
            ex.execution_count = int(msg.get("execution_count", 0))
        elif kind in ("stdout", "stderr"):
            text = str(msg.get("text", ""))
            (ex.logs.stdout if kind == "stdout" else ex.logs.stderr).append(text)
            return kind, text
        elif kind == "result":
            result = Result.from_json(msg)
            ex.results.append(result)
            return "result", result
        elif kind == "error":
            err = ExecutionError(
                name=str(msg.get("name", "")),
                value=str(msg.get("value", "")),
                traceback=str(msg.get("traceback", "")),
            )
            ex.error = err
            return "error", err
        elif kind == "end_of_execution":
            self.done = True
        return None

    def finish(self) -> Execution:
        """The execution, once the stream ended; an unfinished one is an error."""
        if not self.done:
            raise MoatError(
                "the interpreter's stream ended before the execution did",
                code="stream_ended",
            )
        return self.execution


def contexts(data: Any) -> list[CodeContext]:
    """Parses the list of contexts."""
    if not isinstance(data, list):
        raise MoatError(
            "the interpreter answered its contexts with something not a list", code="bad_answer"
        )
    return [CodeContext.from_json(c) for c in data]
