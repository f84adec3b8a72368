"""``MoatEnvironment``: ADK's ``BaseEnvironment`` (shell commands and files) in a moat sandbox."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.adk.environment import BaseEnvironment, ExecutionResult
from typing_extensions import override

from ...client import AsyncClient
from ...errors import ConflictError, NotFoundError, PermissionDeniedError
from ...models import ExecResult, Network, Resources
from ...sandbox import AsyncSandbox
from . import _common

__all__ = ["MoatEnvironment"]

logger = logging.getLogger(__name__)


# ADK marks BaseEnvironment experimental: constructing it warns. This class does not call its
# (empty) __init__, as ADK's own environments do not, so using it warns only through ADK's tools.
class MoatEnvironment(BaseEnvironment):
    """An ADK environment whose commands and files are those of one moat sandbox.

    Give it to ADK's ``EnvironmentToolset(environment=...)``, which calls :meth:`initialize`
    before its tools' first use (that makes the sandbox and its working directory) and
    :meth:`close` when the runner closes (that kills it); both may be called more than once.

    ``working_dir`` (default ``workspace``: under the sandbox user's home unless absolute) is
    made when missing; commands start in it and relative paths are resolved against it.
    Absolute paths reach anywhere the sandbox's user may: the sandbox is the boundary.
    ``idle_timeout`` (seconds, default 600) is how long the sandbox lives after its last use
    before the server kills it, should :meth:`close` never come; a use after that gets a fresh
    sandbox (without the old one's files), as ADK initializes an environment only once. ``network`` is ``False`` (no
    network) unless given: ``True`` for the internet, ``None`` for the template's policy, or a
    :class:`moat.Network`. ``template``, ``resources`` and ``env`` are the sandbox's;
    ``url`` and ``api_key`` default to ``MOAT_URL`` and ``MOAT_API_KEY``, or ``client`` gives
    a connection to share (which :meth:`close` leaves open).
    """

    def __init__(
        self,
        *,
        template: str | None = None,
        working_dir: str = _common.DEFAULT_WORKING_DIR,
        network: Network | Mapping[str, Any] | bool | None = False,
        resources: Resources | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        idle_timeout: float = 600.0,
        url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
    ) -> None:
        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise ValueError(f"template must be a template's name, not {template!r}")
        if client is not None and (url is not None or api_key is not None):
            raise ValueError("give a client or url/api_key, not both")
        self._template = template
        self._requested_dir = _common.check_working_dir(working_dir)
        self._network = Network.coerce(network)
        self._resources = Resources.coerce(resources)
        self._env = dict(env or {})
        self._metadata = {"integration": "google-adk", **dict(metadata or {})}
        self._idle_timeout = _common.check_idle_timeout(idle_timeout)
        self._url = url
        self._api_key = api_key
        self._given_client = client
        self._client: AsyncClient | None = None
        self._sandbox: AsyncSandbox | None = None
        self._working_dir: str | None = None
        # Set by close(): a call still under way then makes no fresh sandbox.
        self._closed = False
        # initialize and close may be called from several tasks at once.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        where = self._sandbox.id if self._sandbox is not None else "not initialized"
        return f"MoatEnvironment({where}, working_dir={self._working_dir or self._requested_dir!r})"

    @property
    def sandbox(self) -> AsyncSandbox | None:
        """The sandbox, between :meth:`initialize` and :meth:`close`."""
        return self._sandbox

    @property
    @override
    def working_dir(self) -> Path:
        """The absolute working directory in the sandbox (known once initialized)."""
        if self._working_dir is None:
            raise RuntimeError("the working directory is known once initialize() has run")
        return Path(self._working_dir)

    @override
    async def initialize(self) -> None:
        """Makes the sandbox and its working directory (nothing when they exist)."""
        async with self._lock:
            if self._sandbox is not None:
                return
            self._closed = False
            client = self._given_client or AsyncClient(url=self._url, api_key=self._api_key)
            try:
                sandbox = await AsyncSandbox.create(
                    self._template,
                    timeout=self._idle_timeout,
                    env=self._env or None,
                    metadata=self._metadata,
                    resources=self._resources,
                    network=self._network,
                    client=client,
                )
                try:
                    entry = await sandbox.files.make_dir(self._requested_dir)
                except BaseException:
                    await _kill(sandbox)
                    raise
            except BaseException:
                if client is not self._given_client:
                    await client.close()
                raise
            self._client, self._sandbox, self._working_dir = client, sandbox, entry.path

    @override
    async def close(self) -> None:
        """Kills the sandbox and closes the connection it opened (nothing when closed)."""
        async with self._lock:
            sandbox, client = self._sandbox, self._client
            self._sandbox = self._client = None
            self._working_dir = None
            self._closed = True
            try:
                if sandbox is not None:
                    await sandbox.kill()
            except NotFoundError:
                pass
            finally:
                if client is not None and client is not self._given_client:
                    await client.close()

    @override
    async def execute(self, command: str, *, timeout: float | None = None) -> ExecutionResult:
        """Runs the shell command ``command`` (``/bin/sh -c``) in the working directory.

        ``timeout`` is in seconds; ``None`` is the longest the server allows a command, an
        hour. A command past its timeout is killed with its whole process group and the
        result says ``timed_out``; the exit code of a command a signal killed is minus the
        signal's number, as Python's subprocess (and ADK's local environment) reports it.
        """
        self._live()
        if not isinstance(command, str):
            raise TypeError(f"command must be a str, not {type(command).__name__}")
        limit = _common.MAX_RUN_SECONDS if timeout is None else timeout
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit <= _common.MAX_RUN_SECONDS:
            raise ValueError(
                f"timeout must be None or more than 0 and at most {_common.MAX_RUN_SECONDS} seconds, not {timeout!r}"
            )
        # The sandbox must outlive the command (whenever it starts in the idle countdown), and
        # then stay for idle_timeout.
        sandbox, working_dir = await self._ready(max(self._idle_timeout, limit + _common.TTL_MARGIN))
        result = await sandbox.exec(command, cwd=working_dir, timeout=limit)
        await sandbox.set_timeout(self._idle_timeout)
        return ExecutionResult(
            exit_code=_exit_code(result),
            stdout=result.stdout,
            stderr=result.stderr,
            timed_out=result.timed_out,
        )

    @override
    async def read_file(self, path: str | Path) -> bytes:
        """The bytes of the file at ``path`` (absolute, or relative to the working
        directory); :class:`FileNotFoundError` when there is none."""
        sandbox, working_dir = await self._ready(self._idle_timeout)
        where = _common.resolve(working_dir, _path_str(path))
        try:
            data = await sandbox.files.read(where)
        except NotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, "no such file in the sandbox", str(path)) from e
        except ConflictError as e:
            if e.code == "is_a_directory":
                raise IsADirectoryError(errno.EISDIR, "a directory, not a file", str(path)) from e
            raise
        except PermissionDeniedError as e:
            raise PermissionError(errno.EACCES, "the sandbox's user may not read it", str(path)) from e
        return data

    @override
    async def write_file(self, path: str | Path, content: str | bytes) -> None:
        """Writes ``content`` (text as UTF-8, or bytes) to the file at ``path`` (absolute, or
        relative to the working directory), replacing it and making missing parents."""
        self._live()
        if not isinstance(content, (str, bytes)):
            raise TypeError(f"content must be str or bytes, not {type(content).__name__}")
        sandbox, working_dir = await self._ready(self._idle_timeout)
        where = _common.resolve(working_dir, _path_str(path))
        try:
            await sandbox.files.write(where, content)
        except ConflictError as e:
            if e.code == "is_a_directory":
                raise IsADirectoryError(errno.EISDIR, "a directory is there", str(path)) from e
            if e.code == "not_a_directory":
                raise NotADirectoryError(errno.ENOTDIR, "a parent is not a directory", str(path)) from e
            raise
        except PermissionDeniedError as e:
            raise PermissionError(errno.EACCES, "the sandbox's user may not write it", str(path)) from e

    # --- inside ---

    def _live(self) -> tuple[AsyncSandbox, str]:
        if self._sandbox is None or self._working_dir is None:
            raise RuntimeError("the environment is not initialized: call initialize() first")
        return self._sandbox, self._working_dir

    async def _ready(self, seconds: float) -> tuple[AsyncSandbox, str]:
        """The sandbox and its working directory, given ``seconds`` to live from now (the idle
        countdown starts again at each use). A sandbox that ended meanwhile (left idle past
        ``idle_timeout``) is replaced by a fresh one, without its files: ADK initializes an
        environment once, so without this every later call would fail."""
        sandbox, working_dir = self._live()
        try:
            await sandbox.set_timeout(seconds)
            return sandbox, working_dir
        except (NotFoundError, ConflictError):
            pass
        logger.warning(
            "sandbox %s of this environment has ended (idle for more than %s s): starting a fresh one, without its files",
            sandbox.id,
            self._idle_timeout,
        )
        async with self._lock:
            if self._closed:
                raise RuntimeError("the environment was closed while this call ran")
            # Another call may have replaced it already: only the ended one is let go.
            client = None
            if self._sandbox is sandbox:
                client = self._client
                self._sandbox = self._client = None
                self._working_dir = None
        if client is not None and client is not self._given_client:
            await client.close()
        await self.initialize()
        sandbox, working_dir = self._live()
        await sandbox.set_timeout(seconds)
        return sandbox, working_dir


def _path_str(path: str | Path) -> str:
    text = str(path) if isinstance(path, Path) else path
    if not isinstance(text, str) or not text or "\0" in text:
        raise ValueError(f"a path must be a non-empty str or Path without NUL, not {path!r}")
    return text


def _exit_code(result: ExecResult) -> int:
    """The exit status as ADK's local environment (Python's subprocess) reports it: minus the
    signal's number for a command a signal killed, SIGKILL's for one killed past its timeout."""
    if result.exit_code is not None:
        return result.exit_code
    number = _signal_number(result.signal)
    return -(number if number is not None else signal.SIGKILL.value)


def _signal_number(description: str | None) -> int | None:
    """The number of the signal the server describes as Go does (``signal: terminated``,
    ``signal: killed (core dumped)``, ``signal 40``)."""
    if not description:
        return None
    text = description.removeprefix("signal:").strip().removesuffix("(core dumped)").strip().lower()
    if text.startswith("signal "):
        number = text.removeprefix("signal ").strip()
        return int(number) if number.isdigit() else None
    return _SIGNALS_BY_DESCRIPTION.get(text)


def _descriptions() -> dict[str, int]:
    """The C library's descriptions of the signals, lower-cased: Go's, which the server
    sends, are the same words."""
    out: dict[str, int] = {}
    for sig in signal.Signals:
        text = signal.strsignal(sig)
        if text:
            out.setdefault(text.lower(), sig.value)
    return out


_SIGNALS_BY_DESCRIPTION = _descriptions()


async def _kill(sandbox: AsyncSandbox) -> None:
    try:
        await sandbox.kill()
    except NotFoundError:
        pass
