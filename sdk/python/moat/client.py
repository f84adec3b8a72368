"""The connection to a moat server, and what is not a sandbox: templates, snapshots, builds,
jobs, API keys and one-shot runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from . import _args
from ._http import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    AsyncTransport,
    Op,
    SyncTransport,
    parse_json,
    resolve_config,
)
from .builds import AsyncBuilds, Builds
from .exec import MAX_EXEC_TIMEOUT
from .jobs import AsyncJobs, Jobs
from .keys import AsyncKeys, Keys
from .models import InputFile, Resources, RunResult
from .snapshots import AsyncSnapshots, Snapshots
from .templates import AsyncTemplates, Templates

__all__ = ["AsyncClient", "Client", "async_run", "run"]

# Beyond its command's own time, a run takes a sandbox and moves files.
_RUN_MARGIN = 120.0
_RUN_DEFAULT = 60


def _run_op(
    code: str | None,
    cmd: Sequence[str] | None,
    shell: str | None,
    *,
    language: str | None,
    template: str | None,
    files: Sequence[InputFile] | Mapping[str, str | bytes] | None,
    stdin: str | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    resources: Resources | Mapping[str, Any] | None,
    output_files: Sequence[str] | None,
) -> Op[RunResult]:
    kind = _args.one_of(code=code, cmd=cmd, shell=shell)
    body: dict[str, Any] = {}
    if kind == "cmd":
        if isinstance(cmd, str):
            raise TypeError("cmd must be an argv (a sequence of str); give a script as shell=")
        assert cmd is not None
        body["cmd"] = _args.command(cmd)[1]
    else:
        value = code if kind == "code" else shell
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{kind} must be a non-empty string")
        body[kind] = value
    if _args.optional_str("language", language) is not None:
        if kind != "code":
            raise ValueError("language goes with code=, not with cmd= or shell=")
        body["language"] = language
    for name, value in (("template", template), ("cwd", cwd)):
        if _args.optional_str(name, value) is not None:
            body[name] = value
    if files:
        if isinstance(files, Mapping):
            items = [InputFile(path=str(p), content=c) for p, c in files.items()]
        elif isinstance(files, (str, bytes)) or not isinstance(files, Sequence):
            raise TypeError(
                "files must be a sequence of InputFile or a mapping of paths to contents"
            )
        else:
            items = list(files)
            if not all(isinstance(f, InputFile) for f in items):
                raise TypeError("each file must be a moat.InputFile")
        body["files"] = [f.to_json() for f in items]
    if stdin is not None:
        if not isinstance(stdin, str):
            raise TypeError("a run's stdin must be text (str)")
        body["stdin"] = stdin
    envs = _args.mapping("env", env)
    if envs:
        body["env"] = envs
    secs = _args.seconds("timeout", timeout, maximum=MAX_EXEC_TIMEOUT)
    if secs is not None:
        body["timeout_secs"] = secs
    res = Resources.coerce(resources)
    if res is not None:
        body["resources"] = res.to_json()
    outs = _args.str_list("output_files", output_files)
    if outs:
        body["output_files"] = outs
    wait = float(secs or _RUN_DEFAULT) + _RUN_MARGIN
    return Op(
        "POST",
        "/v1/run",
        parse_json(RunResult.from_json),
        json=body,
        timeout=httpx.Timeout(wait, connect=10.0),
    )


class Client:
    """A connection to a moat server.

    ``url`` and ``api_key`` default to ``MOAT_URL`` and ``MOAT_API_KEY``. ``timeout`` bounds
    each wait of a request (calls that wait for commands allow them their own time, and
    while it is the default, calls the server may take minutes over, such as a create waiting
    for a template's ready script or a snapshot, wait as long as the server may take);
    ``retries`` is how often a ``GET`` that could not connect, or met a 503, is tried again.
    ``http_client`` lets the caller supply its own :class:`httpx.Client` (proxies, TLS).
    Close it with :meth:`close` or a ``with`` block.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url, self._api_key = resolve_config(url, api_key)
        self._transport = SyncTransport(
            self.url, self._api_key, timeout=timeout, retries=retries, http_client=http_client
        )
        #: Templates and their warm pools.
        self.templates = Templates(self._transport)
        #: Snapshots of sandboxes.
        self.snapshots = Snapshots(self._transport)
        #: Template builds from Dockerfiles.
        self.builds = Builds(self._transport)
        #: Asynchronous jobs and their blobs.
        self.jobs = Jobs(self._transport)
        #: API keys (admin keys only).
        self.keys = Keys(self._transport)

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def run(
        self,
        code: str | None = None,
        *,
        cmd: Sequence[str] | None = None,
        shell: str | None = None,
        language: str | None = None,
        template: str | None = None,
        files: Sequence[InputFile] | Mapping[str, str | bytes] | None = None,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        output_files: Sequence[str] | None = None,
    ) -> RunResult:
        """One shot: a fresh sandbox (from the template's warm pool when it has one), the
        ``files`` written, the code or command run, ``output_files`` read back, the sandbox
        destroyed, in one call.

        Give exactly one of ``code`` (in ``language``: ``python``, the default, ``bash``,
        ``sh`` or ``javascript``), ``cmd`` and ``shell``. ``files`` maps paths (relative ones
        under the working directory) to text or bytes.
        """
        return self._transport.call(
            _run_op(
                code,
                cmd,
                shell,
                language=language,
                template=template,
                files=files,
                stdin=stdin,
                env=env,
                cwd=cwd,
                timeout=timeout,
                resources=resources,
                output_files=output_files,
            )
        )

    def openapi(self) -> dict[str, Any]:
        """The server's OpenAPI document."""
        return self._transport.call(Op("GET", "/v1/openapi.json", parse_json(dict)))

    def close(self) -> None:
        """Closes the connection pool."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """A connection to a moat server, for asyncio (see :class:`Client`)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url, self._api_key = resolve_config(url, api_key)
        self._transport = AsyncTransport(
            self.url, self._api_key, timeout=timeout, retries=retries, http_client=http_client
        )
        #: Templates and their warm pools.
        self.templates = AsyncTemplates(self._transport)
        #: Snapshots of sandboxes.
        self.snapshots = AsyncSnapshots(self._transport)
        #: Template builds from Dockerfiles.
        self.builds = AsyncBuilds(self._transport)
        #: Asynchronous jobs and their blobs.
        self.jobs = AsyncJobs(self._transport)
        #: API keys (admin keys only).
        self.keys = AsyncKeys(self._transport)

    def __repr__(self) -> str:
        return f"AsyncClient(url={self.url!r})"

    async def run(
        self,
        code: str | None = None,
        *,
        cmd: Sequence[str] | None = None,
        shell: str | None = None,
        language: str | None = None,
        template: str | None = None,
        files: Sequence[InputFile] | Mapping[str, str | bytes] | None = None,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        output_files: Sequence[str] | None = None,
    ) -> RunResult:
        """One shot (see :meth:`Client.run`)."""
        return await self._transport.call(
            _run_op(
                code,
                cmd,
                shell,
                language=language,
                template=template,
                files=files,
                stdin=stdin,
                env=env,
                cwd=cwd,
                timeout=timeout,
                resources=resources,
                output_files=output_files,
            )
        )

    async def openapi(self) -> dict[str, Any]:
        """The server's OpenAPI document."""
        return await self._transport.call(Op("GET", "/v1/openapi.json", parse_json(dict)))

    async def close(self) -> None:
        """Closes the connection pool."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def run(
    code: str | None = None,
    *,
    cmd: Sequence[str] | None = None,
    shell: str | None = None,
    language: str | None = None,
    template: str | None = None,
    files: Sequence[InputFile] | Mapping[str, str | bytes] | None = None,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    output_files: Sequence[str] | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> RunResult:
    """One shot with a client of its own (see :meth:`Client.run`): ``moat.run("print(6*7)")``."""
    with Client(url=url, api_key=api_key) as client:
        return client.run(
            code,
            cmd=cmd,
            shell=shell,
            language=language,
            template=template,
            files=files,
            stdin=stdin,
            env=env,
            cwd=cwd,
            timeout=timeout,
            resources=resources,
            output_files=output_files,
        )


async def async_run(
    code: str | None = None,
    *,
    cmd: Sequence[str] | None = None,
    shell: str | None = None,
    language: str | None = None,
    template: str | None = None,
    files: Sequence[InputFile] | Mapping[str, str | bytes] | None = None,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    output_files: Sequence[str] | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> RunResult:
    """One shot with an async client of its own (see :meth:`Client.run`)."""
    async with AsyncClient(url=url, api_key=api_key) as client:
        return await client.run(
            code,
            cmd=cmd,
            shell=shell,
            language=language,
            template=template,
            files=files,
            stdin=stdin,
            env=env,
            cwd=cwd,
            timeout=timeout,
            resources=resources,
            output_files=output_files,
        )
