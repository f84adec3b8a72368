"""Running commands in a sandbox: the request, and the event streams (NDJSON) that follow a
command as it runs.

The SDK always asks for output in base64, so results carry the exact bytes as well as text.
"""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from types import TracebackType
from typing import Any

import httpx

from . import _args
from .errors import MoatConnectionError, MoatError, SandboxTimeoutError
from .models import ExecEnd, ExecEvent, ExecEventDecoder, ExecOutput, ExecResult

__all__ = ["AsyncExecStream", "ExecStream", "OutputCallback"]

#: Longest timeout a command may have, seconds.
MAX_EXEC_TIMEOUT = 3600
# The server's timeout of a command that names none.
_SERVER_DEFAULT_TIMEOUT = 60
# How much longer than its command the client waits for an answer (queueing, start-up).
_ANSWER_MARGIN = 60.0

#: A callback given output text as it arrives; an async client's may be a coroutine function.
OutputCallback = Callable[[str], Any]

NDJSON = "application/x-ndjson"


def exec_body(
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | None,
    stdin: str | bytes | None,
    timeout: float | None,
) -> dict[str, Any]:
    """The ``ExecRequest`` JSON."""
    kind, value = _args.command(command)
    body: dict[str, Any] = {kind: value, "encoding": "base64"}
    envs = _args.mapping("env", env)
    if envs:
        body["env"] = envs
    if _args.optional_str("cwd", cwd) is not None:
        body["cwd"] = cwd
    if _args.user(user) is not None:
        body["user"] = user
    if stdin is not None:
        if isinstance(stdin, str):
            body["stdin"] = stdin
        elif isinstance(stdin, (bytes, bytearray, memoryview)):
            body["stdin_b64"] = base64.b64encode(bytes(stdin)).decode()
        else:
            raise TypeError(f"stdin must be str or bytes, not {type(stdin).__name__}")
    secs = _args.seconds("timeout", timeout, maximum=MAX_EXEC_TIMEOUT)
    if secs is not None:
        body["timeout_secs"] = secs
    return body


def answer_timeout(body: Mapping[str, Any]) -> httpx.Timeout:
    """How long to wait for the answer (or the next event) of the command ``body`` asks for."""
    secs = float(body.get("timeout_secs", _SERVER_DEFAULT_TIMEOUT)) + _ANSWER_MARGIN
    return httpx.Timeout(secs, connect=10.0)


def _parse_line(line: str) -> Mapping[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        value = json.loads(line)
    except ValueError as e:
        raise MoatError(
            f"the server sent a stream line that is not JSON: {line[:200]!r}", code="bad_answer"
        ) from e
    if not isinstance(value, dict):
        raise MoatError("the server sent a stream line that is not an object", code="bad_answer")
    return value


def _unfinished() -> MoatConnectionError:
    return MoatConnectionError(
        "the exec stream ended before the command did; how it ended is unknown",
        code="stream_ended",
    )


class _Collector:
    """Gathers a stream's output into an :class:`ExecResult`."""

    def __init__(self) -> None:
        self.out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def add(self, ev: ExecOutput) -> None:
        self.out[ev.stream].append(ev.data)

    def result(self, end: ExecEnd) -> ExecResult:
        return ExecResult(
            stdout_bytes=b"".join(self.out["stdout"]),
            stderr_bytes=b"".join(self.out["stderr"]),
            exit_code=end.exit_code,
            signal=end.signal,
            duration_ms=end.duration_ms,
            timed_out=end.timed_out,
            oom_killed=end.oom_killed,
        )


class ExecStream:
    """A command's events as they happen: :class:`~moat.models.ExecStart`, then
    :class:`~moat.models.ExecOutput` pieces, then one :class:`~moat.models.ExecEnd`.

    Iterate over it; use it in a ``with`` block (or call :meth:`close`) to stop following
    early, which kills the command. If following fails after the start (the sandbox was
    deleted), iteration raises the :class:`~moat.errors.MoatError` the server sent.
    """

    def __init__(self, stack: ExitStack, response: httpx.Response) -> None:
        self._stack = stack
        self._response = response
        self._decoder = ExecEventDecoder()
        self._done = False
        # One reader of the answer's lines for every loop over the stream, so that a loop
        # left early (`break`) is taken up where it stopped by the next one, or by `wait`.
        self._lines: Iterator[str] | None = None

    @property
    def end(self) -> ExecEnd | None:
        """How the command ended, once the stream has been read to its end."""
        return self._decoder.end

    def __iter__(self) -> Iterator[ExecEvent]:
        """The command's events from where the last loop over the stream left off. Leaving a
        loop early keeps the command running: :meth:`close` (or the ``with`` block's end)
        stops it."""
        if self._done or self._decoder.end is not None:
            self.close()
            return
        if self._lines is None:
            self._lines = self._response.iter_lines()
        try:
            for line in self._lines:
                parsed = _parse_line(line)
                if parsed is None:
                    continue
                ev = self._decoder.event(parsed)
                if ev is not None:
                    yield ev
                if self._decoder.end is not None:
                    self.close()
                    return
            raise _unfinished()
        except GeneratorExit:
            # Left at its last event: nothing more to follow.
            if self._decoder.end is not None:
                self.close()
            raise
        except httpx.HTTPError as e:
            self.close()
            raise _stream_error(e) from e
        except BaseException:
            self.close()
            raise

    def wait(self) -> ExecResult:
        """Reads the rest of the stream; the command's result with the output not yet read."""
        collector = _Collector()
        for ev in self:
            if isinstance(ev, ExecOutput):
                collector.add(ev)
        if self.end is None:
            raise _unfinished()
        return collector.result(self.end)

    def close(self) -> None:
        """Stops following the command (the server then kills it if it still runs)."""
        self._done = True
        self._stack.close()

    def __enter__(self) -> ExecStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _stream_error(e: httpx.HTTPError) -> MoatError:
    """The SDK's error for a stream that broke: a timeout as every call's, else a lost
    connection."""
    if isinstance(e, httpx.TimeoutException):
        return SandboxTimeoutError(
            f"following the command: no answer in time ({type(e).__name__})",
            code="client_timeout",
        )
    return MoatConnectionError(f"following the command failed: {e}", code="stream_failed")


def run_with_callbacks(
    stream: ExecStream, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
) -> ExecResult:
    """Follows ``stream`` to its end, handing output to the callbacks."""
    collector = _Collector()
    with stream:
        for ev in stream:
            if isinstance(ev, ExecOutput):
                collector.add(ev)
                cb = on_stdout if ev.stream == "stdout" else on_stderr
                if cb is not None and ev.text:
                    cb(ev.text)
    if stream.end is None:
        raise _unfinished()
    return collector.result(stream.end)


class AsyncExecStream:
    """The async form of :class:`ExecStream`: ``async for`` over it, ``async with`` it."""

    def __init__(self, stack: AsyncExitStack, response: httpx.Response) -> None:
        self._stack = stack
        self._response = response
        self._decoder = ExecEventDecoder()
        self._done = False
        # As in ExecStream: one reader of the lines for every loop over the stream.
        self._lines: AsyncIterator[str] | None = None

    @property
    def end(self) -> ExecEnd | None:
        """How the command ended, once the stream has been read to its end."""
        return self._decoder.end

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        """As :meth:`ExecStream.__iter__`."""
        if self._done or self._decoder.end is not None:
            await self.close()
            return
        if self._lines is None:
            self._lines = self._response.aiter_lines()
        try:
            async for line in self._lines:
                parsed = _parse_line(line)
                if parsed is None:
                    continue
                ev = self._decoder.event(parsed)
                if ev is not None:
                    yield ev
                if self._decoder.end is not None:
                    await self.close()
                    return
            raise _unfinished()
        except GeneratorExit:
            raise
        except httpx.HTTPError as e:
            await self.close()
            raise _stream_error(e) from e
        except BaseException:
            await self.close()
            raise

    async def wait(self) -> ExecResult:
        """Reads the rest of the stream; the command's result with the output not yet read."""
        collector = _Collector()
        async for ev in self:
            if isinstance(ev, ExecOutput):
                collector.add(ev)
        if self.end is None:
            raise _unfinished()
        return collector.result(self.end)

    async def close(self) -> None:
        """Stops following the command (the server then kills it if it still runs)."""
        self._done = True
        await self._stack.aclose()

    async def __aenter__(self) -> AsyncExecStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def arun_with_callbacks(
    stream: AsyncExecStream, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None
) -> ExecResult:
    """Follows ``stream`` to its end, handing output to the callbacks (awaited when async)."""
    collector = _Collector()
    async with stream:
        async for ev in stream:
            if isinstance(ev, ExecOutput):
                collector.add(ev)
                cb = on_stdout if ev.stream == "stdout" else on_stderr
                if cb is not None and ev.text:
                    out = cb(ev.text)
                    if inspect.isawaitable(out):
                        await out
    if stream.end is None:
        raise _unfinished()
    return collector.result(stream.end)
