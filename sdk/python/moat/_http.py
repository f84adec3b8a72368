"""HTTP plumbing shared by the sync and async clients.

An API call is described once, as an :class:`Op` (method, path, query, body, how to read the
answer); :class:`SyncTransport` and :class:`AsyncTransport` carry it out. Both turn error
answers into :mod:`moat.errors` exceptions, and retry only what is safe to repeat: ``GET``
and ``HEAD`` requests that could not connect or were answered 503, a few times with a short
backoff.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from ._version import __version__
from .errors import (
    ConfigurationError,
    MoatConnectionError,
    MoatError,
    SandboxTimeoutError,
    error_for,
)

T = TypeVar("T")

#: Seconds to connect, and to wait for each read or write, unless a call says otherwise.
DEFAULT_TIMEOUT: httpx.Timeout = httpx.Timeout(300.0, connect=10.0, pool=60.0)
#: How long calls that may take the server minutes wait for their answer: a create (a
#: template's ready script, up to 600 s), a snapshot (up to 600 s), a pause (a gVisor sandbox
#: saved to disk, up to 900 s) or a resume. Past the client's own timeout the server would
#: still finish the call, and a caller that gave up would not learn of it.
LONG_CALL_TIMEOUT: httpx.Timeout = httpx.Timeout(960.0, connect=10.0, pool=60.0)
#: A fork: a snapshot of the source, then its copies made.
FORK_TIMEOUT: httpx.Timeout = httpx.Timeout(1560.0, connect=10.0, pool=60.0)
#: Attempts after the first for a safe request that could not connect or met a 503.
DEFAULT_RETRIES = 2
# Waits before each retry; a server's Retry-After counts, up to the last.
_BACKOFF = (0.25, 1.0, 2.0)
_MAX_RETRY_WAIT = 5.0
_IDEMPOTENT = frozenset({"GET", "HEAD"})

_NO_BODY = object()


class _UseDefault:
    """The client's own timeout (``None`` would mean no timeout at all)."""


USE_DEFAULT = _UseDefault()
TimeoutArg = float | httpx.Timeout | None | _UseDefault


def seg(value: str) -> str:
    """``value`` as one path segment (ids and names from callers are never trusted as paths)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"an id or name must be a non-empty string, not {value!r}")
    return quote(value, safe="")


@dataclass
class Op(Generic[T]):
    """One API call and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Sequence[tuple[str, str]] = ()
    json: Any = _NO_BODY
    content: bytes | Iterator[bytes] | AsyncIterator[bytes] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    ok: tuple[int, ...] = (200,)
    timeout: TimeoutArg = USE_DEFAULT
    #: The wait for a call the server may take minutes over, in place of the client's own
    #: timeout while that is the default one (a timeout the caller chose stands).
    slow: httpx.Timeout | None = None
    #: Send the API key (not to a sandbox's own services, which need none and must not see it).
    auth: bool = True


def parse_json(build: Callable[[Any], T]) -> Callable[[httpx.Response], T]:
    """A parser of a JSON answer through ``build``."""

    def parse(r: httpx.Response) -> T:
        return build(answer_json(r))

    return parse


def parse_none(_r: httpx.Response) -> None:
    """A parser of an answer whose body does not matter."""
    return None


def answer_json(r: httpx.Response) -> Any:
    """The JSON body of ``r``; a server that answers something else is an error."""
    try:
        return r.json()
    except ValueError as e:
        raise MoatError(
            f"the server answered {r.status_code} with a body that is not JSON",
            status=r.status_code,
            code="bad_answer",
        ) from e


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_from_response(r: httpx.Response) -> MoatError:
    """The exception for an error answer whose body has been read.

    The API answers ``{"error": {"code", "message"}}``; a sandbox's own services and the
    proxy in front of them answer ``{"code": STATUS, "message"}`` or plain text.
    """
    code: str | None = None
    message = ""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = str(err.get("code")) if err.get("code") is not None else None
            message = str(err.get("message", ""))
        elif isinstance(body.get("message"), str):
            message = body["message"]
    if not message:
        message = r.text.strip()[:2000] or (r.reason_phrase or "error")
    return error_for(r.status_code, code, message, retry_after=_retry_after(r))


def _transport_error(e: httpx.HTTPError, what: str) -> MoatError:
    if isinstance(e, httpx.TimeoutException):
        return SandboxTimeoutError(
            f"{what}: no answer in time ({type(e).__name__})", code="client_timeout"
        )
    return MoatConnectionError(f"{what}: {e or type(e).__name__}", code="connection_failed")


def _closed() -> MoatError:
    return MoatError(
        "this client (or the sandbox object that owned it) has been closed", code="client_closed"
    )


def _retry_wait(attempt: int, r: httpx.Response | None) -> float:
    wait = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
    if r is not None:
        hint = _retry_after(r)
        if hint is not None:
            wait = max(wait, hint)
    return min(wait, _MAX_RETRY_WAIT)


def resolve_config(url: str | None, api_key: str | None) -> tuple[str, str]:
    """The server URL and API key: the arguments, else ``MOAT_URL`` and ``MOAT_API_KEY``."""
    url = url if url is not None else os.environ.get("MOAT_URL")
    api_key = api_key if api_key is not None else os.environ.get("MOAT_API_KEY")
    if not url:
        raise ConfigurationError("no server URL: pass url=... or set MOAT_URL (http://HOST:PORT)")
    if not api_key:
        raise ConfigurationError("no API key: pass api_key=... or set MOAT_API_KEY")
    url = url.strip().rstrip("/")
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(
            f"the server URL must be http://HOST[:PORT] or https://..., not {url!r}"
        )
    if any(c.isspace() for c in api_key) or not api_key.isprintable():
        raise ConfigurationError("the API key has spaces or control characters")
    return url, api_key.strip()


class _Base:
    def __init__(self, url: str, api_key: str, retries: int) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.url = url
        self.retries = retries
        self._auth = {"Authorization": f"Bearer {api_key}"}

    _default_timeout = False

    def _timeout_of(self, op: Op[Any]) -> TimeoutArg:
        """The timeout of ``op``'s request: its own, else its ``slow`` one while the client
        keeps the default timeout, else the client's."""
        if isinstance(op.timeout, _UseDefault) and op.slow is not None and self._default_timeout:
            return op.slow
        return op.timeout

    def _request(
        self,
        client: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        json_body: Any = _NO_BODY,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutArg = USE_DEFAULT,
        auth: bool = True,
    ) -> httpx.Request:
        h: dict[str, str] = dict(self._auth) if auth else {}
        if headers:
            h.update(headers)
        if json_body is not _NO_BODY:
            content = json.dumps(json_body).encode()
            h.setdefault("Content-Type", "application/json")
        extensions: dict[str, Any] = {}
        if not isinstance(timeout, _UseDefault):
            t = (
                timeout
                if isinstance(timeout, httpx.Timeout)
                else httpx.Timeout(timeout, connect=10.0)
            )
            extensions["timeout"] = t.as_dict()
        return client.build_request(
            method,
            self.url + path,
            params=list(params) or None,
            content=content,
            headers=h,
            extensions=extensions,
        )


class SyncTransport(_Base):
    """Carries out calls with an :class:`httpx.Client`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(url, api_key, retries)
        self._owns = http_client is None
        self._default_timeout = http_client is None and timeout is DEFAULT_TIMEOUT
        self.http = http_client or httpx.Client(
            timeout=timeout, headers={"User-Agent": f"moat-sdk-python/{__version__}"}
        )

    def close(self) -> None:
        """Closes the connection pool (when this transport made it)."""
        if self._owns:
            self.http.close()

    def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Sends ``request``, retrying it when safe; an error answer raises (its body read)."""
        if self.http.is_closed:
            raise _closed()
        attempt = 0
        while True:
            try:
                r = self.http.send(request, stream=stream)
            except httpx.HTTPError as e:
                if (
                    request.method in _IDEMPOTENT
                    and attempt < self.retries
                    and isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError))
                ):
                    time.sleep(_retry_wait(attempt, None))
                    attempt += 1
                    continue
                raise _transport_error(e, f"{request.method} {request.url.path}") from e
            if r.is_success:
                return r
            try:
                r.read()
            finally:
                r.close()
            if request.method in _IDEMPOTENT and r.status_code == 503 and attempt < self.retries:
                time.sleep(_retry_wait(attempt, r))
                attempt += 1
                continue
            raise error_from_response(r)

    def call(self, op: Op[T]) -> T:
        """Carries out ``op`` and parses its answer."""
        req = self._request(
            self.http,
            op.method,
            op.path,
            params=op.params,
            json_body=op.json,
            content=op.content,
            headers=op.headers,
            timeout=self._timeout_of(op),
            auth=op.auth,
        )
        r = self.send(req)
        if r.status_code not in op.ok:
            raise MoatError(
                f"{op.method} {op.path}: unexpected status {r.status_code}",
                status=r.status_code,
                code="bad_answer",
            )
        return op.parse(r)

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        json_body: Any = _NO_BODY,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutArg = USE_DEFAULT,
        auth: bool = True,
    ) -> Iterator[httpx.Response]:
        """A streamed answer (a success: errors raise), closed when the block ends."""
        req = self._request(
            self.http,
            method,
            path,
            params=params,
            json_body=json_body,
            content=content,
            headers=headers,
            timeout=timeout,
            auth=auth,
        )
        r = self.send(req, stream=True)
        try:
            yield r
        except httpx.HTTPError as e:
            raise _transport_error(e, f"{method} {path}") from e
        finally:
            r.close()


class AsyncTransport(_Base):
    """Carries out calls with an :class:`httpx.AsyncClient`."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(url, api_key, retries)
        self._owns = http_client is None
        self._default_timeout = http_client is None and timeout is DEFAULT_TIMEOUT
        self.http = http_client or httpx.AsyncClient(
            timeout=timeout, headers={"User-Agent": f"moat-sdk-python/{__version__}"}
        )

    async def close(self) -> None:
        """Closes the connection pool (when this transport made it)."""
        if self._owns:
            await self.http.aclose()

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Sends ``request``, retrying it when safe; an error answer raises (its body read)."""
        if self.http.is_closed:
            raise _closed()
        attempt = 0
        while True:
            try:
                r = await self.http.send(request, stream=stream)
            except httpx.HTTPError as e:
                if (
                    request.method in _IDEMPOTENT
                    and attempt < self.retries
                    and isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError))
                ):
                    await asyncio.sleep(_retry_wait(attempt, None))
                    attempt += 1
                    continue
                raise _transport_error(e, f"{request.method} {request.url.path}") from e
            if r.is_success:
                return r
            try:
                await r.aread()
            finally:
                await r.aclose()
            if request.method in _IDEMPOTENT and r.status_code == 503 and attempt < self.retries:
                await asyncio.sleep(_retry_wait(attempt, r))
                attempt += 1
                continue
            raise error_from_response(r)

    async def call(self, op: Op[T]) -> T:
        """Carries out ``op`` and parses its answer."""
        req = self._request(
            self.http,
            op.method,
            op.path,
            params=op.params,
            json_body=op.json,
            content=op.content,
            headers=op.headers,
            timeout=self._timeout_of(op),
            auth=op.auth,
        )
        r = await self.send(req)
        if r.status_code not in op.ok:
            raise MoatError(
                f"{op.method} {op.path}: unexpected status {r.status_code}",
                status=r.status_code,
                code="bad_answer",
            )
        return op.parse(r)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        json_body: Any = _NO_BODY,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutArg = USE_DEFAULT,
        auth: bool = True,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed answer (a success: errors raise), closed when the block ends."""
        req = self._request(
            self.http,
            method,
            path,
            params=params,
            json_body=json_body,
            content=content,
            headers=headers,
            timeout=timeout,
            auth=auth,
        )
        r = await self.send(req, stream=True)
        try:
            yield r
        except httpx.HTTPError as e:
            raise _transport_error(e, f"{method} {path}") from e
        finally:
            await r.aclose()
