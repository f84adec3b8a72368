"""Sandboxes: :class:`Sandbox` (sync) and :class:`AsyncSandbox` (asyncio)."""

from __future__ import annotations

import dataclasses

import builtins
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _args
from . import code as _code
from . import exec as _exec
from ._http import (
    FORK_TIMEOUT,
    LONG_CALL_TIMEOUT,
    Op,
    answer_json,
    parse_json,
    parse_none,
    seg,
)
from .errors import MoatError, NotFoundError, SandboxTimeoutError, error_for
from .files import AsyncFiles, Files
from .models import (
    SANDBOX_STATES,
    CodeContext,
    ExecResult,
    Execution,
    Lifecycle,
    Network,
    Resources,
    SandboxInfo,
    SandboxNetwork,
    Snapshot,
)

if TYPE_CHECKING:
    from .client import AsyncClient, Client

__all__ = ["AsyncSandbox", "ForkResult", "Sandbox"]

S = TypeVar("S")

#: Most copies one fork may make.
MAX_FORK_COUNT = 20


# --- the calls, shared by both clients -----------------------------------------------------


def _path(sandbox_id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{seg(sandbox_id)}{rest}"


def create_op(
    template: str | None,
    *,
    snapshot: str | None,
    timeout: float | None,
    env: Mapping[str, str] | None,
    metadata: Mapping[str, str] | None,
    resources: Resources | Mapping[str, Any] | None,
    network: Network | Mapping[str, Any] | bool | None,
    public_traffic: bool | None,
    lifecycle: Lifecycle | None,
) -> Op[SandboxInfo]:
    """``POST /v1/sandboxes``."""
    body: dict[str, Any] = {}
    if template is not None and snapshot is not None:
        raise ValueError("give a template or a snapshot, not both (a snapshot has its template)")
    if _args.optional_str("template", template) is not None:
        body["template"] = template
    if _args.optional_str("snapshot", snapshot) is not None:
        body["snapshot"] = snapshot
    res = Resources.coerce(resources)
    if res is not None:
        if snapshot is not None:
            raise ValueError("a sandbox made from a snapshot has the snapshot's resources")
        body["resources"] = res.to_json()
    if env:
        body["env"] = _args.mapping("env", env)
    if metadata:
        body["metadata"] = _args.mapping("metadata", metadata)
    secs = _args.seconds("timeout", timeout)
    if secs is not None:
        body["timeout_secs"] = secs
    if public_traffic is not None:
        if not isinstance(public_traffic, bool):
            raise TypeError("public_traffic must be a bool")
        body["public_traffic"] = public_traffic
    if lifecycle is not None:
        if not isinstance(lifecycle, Lifecycle):
            raise TypeError("lifecycle must be a moat.Lifecycle")
        body["lifecycle"] = lifecycle.to_json()
    net = Network.coerce(network)
    if net is not None:
        body["network"] = net.to_json()
    return Op(
        "POST",
        "/v1/sandboxes",
        parse_json(SandboxInfo.from_json),
        json=body,
        ok=(201,),
        slow=LONG_CALL_TIMEOUT,
    )


def get_op(sandbox_id: str) -> Op[SandboxInfo]:
    """``GET /v1/sandboxes/{id}``."""
    return Op("GET", _path(sandbox_id), parse_json(SandboxInfo.from_json))


def list_op(
    state: str | Sequence[str] | None,
    metadata: Mapping[str, str] | None,
    after: str | None,
    page: int,
) -> Op[tuple[list[SandboxInfo], str | None]]:
    """One page of ``GET /v1/sandboxes``."""
    params: list[tuple[str, str]] = [
        ("state", s) for s in _args.states("state", state, SANDBOX_STATES)
    ]
    for k, v in _args.mapping("metadata", metadata).items():
        # The server splits a pair at its first '=': a key holding one would filter on
        # another key, silently.
        if "=" in k:
            raise ValueError(f"a metadata key to filter on cannot hold '=': {k!r}")
        params.append(("metadata", f"{k}={v}"))
    if after is not None:
        params.append(("after", after))
    params.append(("limit", str(page)))

    def parse(j: Any) -> tuple[list[SandboxInfo], str | None]:
        return [SandboxInfo.from_json(s) for s in j["sandboxes"]], j.get("next")

    return Op("GET", "/v1/sandboxes", parse_json(parse), params=params)


def page_size(limit: int | None) -> int:
    """The page size to ask for when at most ``limit`` items are wanted."""
    _args.count("limit", limit)
    return min(limit or 1000, 1000)


def kill_op(sandbox_id: str) -> Op[None]:
    """``DELETE /v1/sandboxes/{id}``."""
    return Op("DELETE", _path(sandbox_id), parse_none, ok=(204,))


def timeout_op(sandbox_id: str, timeout: float) -> Op[SandboxInfo]:
    """``POST /v1/sandboxes/{id}/timeout``."""
    secs = _args.seconds("timeout", timeout)
    if secs is None:
        raise ValueError("timeout is required")
    return Op(
        "POST",
        _path(sandbox_id, "/timeout"),
        parse_json(SandboxInfo.from_json),
        json={"timeout_secs": secs},
    )


def _with_tokens(new: SandboxInfo, old: SandboxInfo) -> SandboxInfo:
    """``new``, keeping ``old``'s access tokens when it has none: only the answers of create
    and get carry them, and code runs need them."""
    if new.access_token is None and old.access_token is not None:
        return dataclasses.replace(
            new,
            access_token=old.access_token,
            traffic_access_token=old.traffic_access_token,
        )
    return new



def pause_op(sandbox_id: str) -> Op[SandboxInfo]:
    """``POST /v1/sandboxes/{id}/pause``."""
    return Op(
        "POST",
        _path(sandbox_id, "/pause"),
        parse_json(SandboxInfo.from_json),
        json={},
        slow=LONG_CALL_TIMEOUT,
    )


def resume_op(sandbox_id: str, timeout: float | None) -> Op[SandboxInfo]:
    """``POST /v1/sandboxes/{id}/resume``."""
    secs = _args.seconds("timeout", timeout)
    body = {} if secs is None else {"timeout_secs": secs}
    return Op(
        "POST",
        _path(sandbox_id, "/resume"),
        parse_json(SandboxInfo.from_json),
        json=body,
        slow=LONG_CALL_TIMEOUT,
    )


def snapshot_op(sandbox_id: str, name: str | None, memory: bool) -> Op[Snapshot]:
    """``POST /v1/sandboxes/{id}/snapshots``."""
    body: dict[str, Any] = {}
    if _args.optional_str("name", name) is not None:
        body["name"] = name
    if memory:
        body["memory"] = True
    return Op(
        "POST",
        _path(sandbox_id, "/snapshots"),
        parse_json(Snapshot.from_json),
        json=body,
        ok=(201,),
        slow=LONG_CALL_TIMEOUT,
    )


def fork_op(
    sandbox_id: str,
    count: int,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
    memory: bool,
) -> Op[list[tuple[SandboxInfo | None, MoatError | None]]]:
    """``POST /v1/sandboxes/{id}/fork``."""
    body: dict[str, Any] = {"count": _args.count("count", count, maximum=MAX_FORK_COUNT)}
    secs = _args.seconds("timeout", timeout)
    if secs is not None:
        body["timeout_secs"] = secs
    if metadata:
        body["metadata"] = _args.mapping("metadata", metadata)
    if memory:
        body["memory"] = True

    def parse(j: Any) -> list[tuple[SandboxInfo | None, MoatError | None]]:
        out: list[tuple[SandboxInfo | None, MoatError | None]] = []
        for item in j["results"]:
            if item.get("sandbox") is not None:
                out.append((SandboxInfo.from_json(item["sandbox"]), None))
            else:
                e = item.get("error") or {}
                out.append(
                    (None, error_for(e.get("status"), e.get("code"), str(e.get("message", ""))))
                )
        return out

    return Op(
        "POST", _path(sandbox_id, "/fork"), parse_json(parse), json=body, ok=(201,), slow=FORK_TIMEOUT
    )


def network_op(
    sandbox_id: str, network: Network | Mapping[str, Any] | bool | None = None
) -> Op[SandboxNetwork]:
    """``GET`` (``network`` None) or ``PUT /v1/sandboxes/{id}/network``."""
    if network is None:
        return Op("GET", _path(sandbox_id, "/network"), parse_json(SandboxNetwork.from_json))
    net = Network.coerce(network)
    assert net is not None
    return Op(
        "PUT",
        _path(sandbox_id, "/network"),
        parse_json(SandboxNetwork.from_json),
        json=net.to_json(),
    )


def _lifecycle(on_timeout: str | None, auto_resume: bool | None) -> Lifecycle | None:
    if on_timeout is None and auto_resume is None:
        return None
    if on_timeout not in (None, "kill", "pause"):
        raise ValueError(f"on_timeout must be 'kill' or 'pause', not {on_timeout!r}")
    return Lifecycle(
        on_timeout="pause" if on_timeout == "pause" else "kill", auto_resume=bool(auto_resume)
    )


@dataclass(frozen=True)
class ForkResult(Generic[S]):
    """What a fork made: per copy asked for, in order, a sandbox or the error that stopped it.

    Iterating over it gives the sandboxes made.
    """

    items: list[S | MoatError]

    @property
    def sandboxes(self) -> list[S]:
        """The copies made."""
        return [i for i in self.items if not isinstance(i, MoatError)]

    @property
    def errors(self) -> list[MoatError]:
        """Why copies could not be made."""
        return [i for i in self.items if isinstance(i, MoatError)]

    def __iter__(self) -> Iterator[S]:
        return iter(self.sandboxes)

    def __len__(self) -> int:
        return len(self.sandboxes)


# --- sync -----------------------------------------------------------------------------------


def _sync_client(
    client: Client | None, url: str | None, api_key: str | None
) -> tuple[Client, bool]:
    from .client import Client

    if client is not None:
        if url is not None or api_key is not None:
            raise ValueError("give a client or url/api_key, not both")
        return client, False
    return Client(url=url, api_key=api_key), True


class Sandbox:
    """A sandbox on a moat server.

    Make one with :meth:`create` or reach an existing one with :meth:`connect`. Used in a
    ``with`` block it is killed when the block ends. Without ``client=``, each sandbox opens
    its own connection to the server (from ``url``/``api_key``, else ``MOAT_URL`` and
    ``MOAT_API_KEY``), closed by :meth:`close` or the end of the ``with`` block.
    """

    def __init__(self, info: SandboxInfo, client: Client, *, owns_client: bool = False) -> None:
        self._info = info
        self._client = client
        self._owns = owns_client
        self._t = client._transport
        #: The sandbox's filesystem.
        self.files = Files(self._t, info.id)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, template={self._info.template!r})"

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._info.id

    @property
    def client(self) -> Client:
        """The client this sandbox talks through."""
        return self._client

    @property
    def last_info(self) -> SandboxInfo:
        """What the server said of the sandbox last (no request; :meth:`info` asks again)."""
        return self._info

    @classmethod
    def create(
        cls,
        template: str | None = None,
        *,
        snapshot: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        network: Network | Mapping[str, Any] | bool | None = None,
        public_traffic: bool | None = None,
        on_timeout: str | None = None,
        auto_resume: bool | None = None,
        client: Client | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """Makes a sandbox and returns it once it runs.

        ``template`` defaults to the server's (``host``); ``snapshot`` makes it from a
        snapshot instead (its template, limits, environment and files). ``timeout`` is its
        time to live in seconds (the server's default, 5 minutes, when absent); ``network``
        is a :class:`~moat.models.Network`, a mapping of its fields, or ``True`` for the
        public internet. ``on_timeout="pause"`` pauses it when its time runs out instead of
        killing it; ``auto_resume`` resumes a paused one when a call needs it.
        """
        op = create_op(
            template,
            snapshot=snapshot,
            timeout=timeout,
            env=env,
            metadata=metadata,
            resources=resources,
            network=network,
            public_traffic=public_traffic,
            lifecycle=_lifecycle(on_timeout, auto_resume),
        )
        c, owns = _sync_client(client, url, api_key)
        try:
            info = c._transport.call(op)
        except BaseException:
            if owns:
                c.close()
            raise
        return cls(info, c, owns_client=owns)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        client: Client | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        """The existing sandbox ``sandbox_id``; :class:`~moat.errors.NotFoundError` when the
        tenant has none of that id."""
        c, owns = _sync_client(client, url, api_key)
        try:
            info = c._transport.call(get_op(sandbox_id))
        except BaseException:
            if owns:
                c.close()
            raise
        return cls(info, c, owns_client=owns)

    @classmethod
    def list(
        cls,
        *,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        client: Client | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """The tenant's sandboxes, oldest first: those in ``state`` (one or several; all
        states when absent) whose metadata has every pair of ``metadata``, at most ``limit``."""
        c, owns = _sync_client(client, url, api_key)
        try:
            out: builtins.list[SandboxInfo] = []
            after: str | None = None
            while True:
                items, after = c._transport.call(list_op(state, metadata, after, page_size(limit)))
                out.extend(items)
                if after is None or (limit is not None and len(out) >= limit):
                    return out[:limit] if limit is not None else out
        finally:
            if owns:
                c.close()

    def info(self) -> SandboxInfo:
        """The sandbox as the server describes it now."""
        self._info = self._t.call(get_op(self.id))
        return self._info

    def is_running(self) -> bool:
        """Whether the sandbox runs now."""
        return self.info().is_running

    def kill(self) -> None:
        """Destroys the sandbox (nothing when it has ended already)."""
        self._t.call(kill_op(self.id))

    def set_timeout(self, timeout: float) -> SandboxInfo:
        """Makes the sandbox expire ``timeout`` seconds from now."""
        self._info = _with_tokens(self._t.call(timeout_op(self.id, timeout)), self._info)
        return self._info

    def pause(self) -> SandboxInfo:
        """Freezes every process of the sandbox (its time to live keeps counting)."""
        self._info = _with_tokens(self._t.call(pause_op(self.id)), self._info)
        return self._info

    def resume(self, *, timeout: float | None = None) -> SandboxInfo:
        """Thaws a paused sandbox; ``timeout`` gives it a new time to live from now."""
        self._info = _with_tokens(self._t.call(resume_op(self.id, timeout)), self._info)
        return self._info

    def snapshot(self, name: str | None = None, *, memory: bool = False) -> Snapshot:
        """Snapshots the sandbox's files (with ``memory``, on backends that can, its memory
        and processes too); ``Sandbox.create(snapshot=s.id)`` starts a sandbox from it."""
        return self._t.call(snapshot_op(self.id, name, memory))

    def fork(
        self,
        count: int = 1,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        memory: bool = False,
    ) -> ForkResult[Sandbox]:
        """Copies the sandbox's files into ``count`` (1 to 20) new sandboxes. A copy that
        could not be made is an error in the result, not an exception: the others stand."""
        made = self._t.call(fork_op(self.id, count, timeout, metadata, memory))
        items: builtins.list[Sandbox | MoatError] = []
        for info, err in made:
            if info is not None:
                items.append(self._sibling(info))
            else:
                assert err is not None
                items.append(err)
        return ForkResult(items)

    def _sibling(self, info: SandboxInfo) -> Sandbox:
        if not self._owns:
            return Sandbox(info, self._client)
        # A sandbox that owns its connection gives its copies their own: closing one must
        # not cut the others off.
        from .client import Client

        c = Client(url=self._client.url, api_key=self._client._api_key)
        return Sandbox(info, c, owns_client=True)

    def get_network(self) -> SandboxNetwork:
        """The sandbox's network policy, with its counters and latest refusals."""
        return self._t.call(network_op(self.id))

    def set_network(self, network: Network | Mapping[str, Any] | bool) -> SandboxNetwork:
        """Replaces the running sandbox's network policy (``False``: no network)."""
        return self._t.call(network_op(self.id, network))

    # --- commands ---

    def exec(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
        on_stdout: _exec.OutputCallback | None = None,
        on_stderr: _exec.OutputCallback | None = None,
    ) -> ExecResult:
        """Runs ``command`` and returns its result once it ended.

        A string is a ``/bin/sh -c`` script, a sequence an argv looked up in ``PATH``.
        ``stdin`` (text or bytes) is its standard input, then end of file. ``timeout``
        (seconds; the server's 60 when absent, at most 3600) kills the command's whole
        process group; the result then says ``timed_out``. With ``on_stdout`` or
        ``on_stderr`` the output is streamed to them as it comes (and still returned).
        A command that fails is a result, not an exception: see :meth:`ExecResult.check`.
        """
        body = _exec.exec_body(command, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        if on_stdout is not None or on_stderr is not None:
            return _exec.run_with_callbacks(self._stream(body), on_stdout, on_stderr)
        return self._t.call(
            Op(
                "POST",
                _path(self.id, "/exec"),
                parse_json(ExecResult.from_json),
                json=body,
                timeout=_exec.answer_timeout(body),
            )
        )

    def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
    ) -> _exec.ExecStream:
        """Starts ``command`` (as :meth:`exec` takes it) and returns its events as they
        happen: iterate over the :class:`~moat.exec.ExecStream`. Closing the stream before the
        end kills the command."""
        body = _exec.exec_body(command, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        return self._stream(body)

    def _stream(self, body: dict[str, Any]) -> _exec.ExecStream:
        stack = ExitStack()
        try:
            r = stack.enter_context(
                self._t.stream(
                    "POST",
                    _path(self.id, "/exec"),
                    json_body=body,
                    headers={"Accept": _exec.NDJSON},
                    timeout=_exec.answer_timeout(body),
                )
            )
        except BaseException:
            stack.close()
            raise
        return _exec.ExecStream(stack, r)

    # --- code ---

    def run_code(
        self,
        code: str,
        *,
        language: str | None = None,
        context: CodeContext | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_stdout: _exec.OutputCallback | None = None,
        on_stderr: _exec.OutputCallback | None = None,
        on_result: _code.ResultCallback | None = None,
        on_error: _code.ErrorCallback | None = None,
    ) -> Execution:
        """Runs ``code`` in a stateful code context and returns what it did.

        Without ``context`` the code runs in the default context of ``language`` (``python``
        when absent; also ``javascript``, ``typescript``, ``bash``), whose variables persist
        between calls. ``env`` applies to this execution only. An exception the code raises is
        ``Execution.error``, not an exception here. Past ``timeout`` seconds the execution is
        interrupted and :class:`~moat.errors.SandboxTimeoutError` raised.
        """
        body = _code.execute_body(code, language, context, env)
        deadline = _code.Deadline(timeout)
        builder = _code.ExecutionBuilder()
        callbacks: dict[str, Any] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        try:
            # Leaving the stream early (the deadline) interrupts the code.
            with self._t.stream(
                "POST",
                "/execute",
                json_body=body,
                headers=_code.headers(self._info),
                timeout=deadline.stream_timeout(),
                auth=False,
            ) as r:
                for line in r.iter_lines():
                    event = builder.feed(line)
                    if event is not None and callbacks[event[0]] is not None:
                        callbacks[event[0]](event[1])
                    if builder.done:
                        break
                    deadline.check()
        except SandboxTimeoutError as e:
            if deadline.passed():
                raise deadline.error() from e
            raise
        return builder.finish()

    def create_code_context(
        self, *, language: str | None = None, cwd: str | None = None
    ) -> CodeContext:
        """A new code context (``python`` unless ``language`` says otherwise) whose state is
        its own; ``cwd`` is its working directory (the user's home by default)."""
        return self._t.call(
            Op(
                "POST",
                "/contexts",
                parse_json(CodeContext.from_json),
                json=_code.context_body(language, cwd),
                headers=_code.headers(self._info),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    def list_code_contexts(self) -> builtins.list[CodeContext]:
        """The sandbox's code contexts (the default ones among them)."""
        return self._t.call(
            Op(
                "GET",
                "/contexts",
                lambda r: _code.contexts(answer_json(r)),
                headers=_code.headers(self._info),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    def restart_code_context(self, context: CodeContext | str) -> None:
        """Restarts a code context: its state is gone."""
        ctx = _code.context_id(context)
        assert ctx is not None
        self._t.call(
            Op(
                "POST",
                f"/contexts/{seg(ctx)}/restart",
                parse_none,
                json={},
                headers=_code.headers(self._info),
                ok=(200, 204),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    def remove_code_context(self, context: CodeContext | str) -> None:
        """Removes a code context."""
        ctx = _code.context_id(context)
        assert ctx is not None
        self._t.call(
            Op(
                "DELETE",
                f"/contexts/{seg(ctx)}",
                parse_none,
                headers=_code.headers(self._info),
                ok=(200, 204),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    # --- lifetime of this object ---

    def close(self) -> None:
        """Closes this object's connection to the server (the sandbox runs on)."""
        if self._owns:
            self._client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        except NotFoundError:
            pass
        finally:
            self.close()


# --- async ----------------------------------------------------------------------------------


def _async_client(
    client: AsyncClient | None, url: str | None, api_key: str | None
) -> tuple[AsyncClient, bool]:
    from .client import AsyncClient

    if client is not None:
        if url is not None or api_key is not None:
            raise ValueError("give a client or url/api_key, not both")
        return client, False
    return AsyncClient(url=url, api_key=api_key), True


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


class AsyncSandbox:
    """A sandbox on a moat server, for asyncio: the same calls as :class:`Sandbox`, awaited.

    ``sandbox = await AsyncSandbox.create()``; ``async with`` kills it when the block ends.
    """

    def __init__(
        self, info: SandboxInfo, client: AsyncClient, *, owns_client: bool = False
    ) -> None:
        self._info = info
        self._client = client
        self._owns = owns_client
        self._t = client._transport
        #: The sandbox's filesystem.
        self.files = AsyncFiles(self._t, info.id)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, template={self._info.template!r})"

    @property
    def id(self) -> str:
        """The sandbox's id."""
        return self._info.id

    @property
    def client(self) -> AsyncClient:
        """The client this sandbox talks through."""
        return self._client

    @property
    def last_info(self) -> SandboxInfo:
        """What the server said of the sandbox last (no request; :meth:`info` asks again)."""
        return self._info

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        *,
        snapshot: str | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        network: Network | Mapping[str, Any] | bool | None = None,
        public_traffic: bool | None = None,
        on_timeout: str | None = None,
        auto_resume: bool | None = None,
        client: AsyncClient | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """Makes a sandbox and returns it once it runs (see :meth:`Sandbox.create`)."""
        op = create_op(
            template,
            snapshot=snapshot,
            timeout=timeout,
            env=env,
            metadata=metadata,
            resources=resources,
            network=network,
            public_traffic=public_traffic,
            lifecycle=_lifecycle(on_timeout, auto_resume),
        )
        c, owns = _async_client(client, url, api_key)
        try:
            info = await c._transport.call(op)
        except BaseException:
            if owns:
                await c.close()
            raise
        return cls(info, c, owns_client=owns)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        client: AsyncClient | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> AsyncSandbox:
        """The existing sandbox ``sandbox_id``; :class:`~moat.errors.NotFoundError` if none."""
        c, owns = _async_client(client, url, api_key)
        try:
            info = await c._transport.call(get_op(sandbox_id))
        except BaseException:
            if owns:
                await c.close()
            raise
        return cls(info, c, owns_client=owns)

    @classmethod
    async def list(
        cls,
        *,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        client: AsyncClient | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> builtins.list[SandboxInfo]:
        """The tenant's sandboxes, oldest first (see :meth:`Sandbox.list`)."""
        c, owns = _async_client(client, url, api_key)
        try:
            out: builtins.list[SandboxInfo] = []
            after: str | None = None
            while True:
                items, after = await c._transport.call(
                    list_op(state, metadata, after, page_size(limit))
                )
                out.extend(items)
                if after is None or (limit is not None and len(out) >= limit):
                    return out[:limit] if limit is not None else out
        finally:
            if owns:
                await c.close()

    async def info(self) -> SandboxInfo:
        """The sandbox as the server describes it now."""
        self._info = await self._t.call(get_op(self.id))
        return self._info

    async def is_running(self) -> bool:
        """Whether the sandbox runs now."""
        return (await self.info()).is_running

    async def kill(self) -> None:
        """Destroys the sandbox (nothing when it has ended already)."""
        await self._t.call(kill_op(self.id))

    async def set_timeout(self, timeout: float) -> SandboxInfo:
        """Makes the sandbox expire ``timeout`` seconds from now."""
        self._info = _with_tokens(await self._t.call(timeout_op(self.id, timeout)), self._info)
        return self._info

    async def pause(self) -> SandboxInfo:
        """Freezes every process of the sandbox (its time to live keeps counting)."""
        self._info = _with_tokens(await self._t.call(pause_op(self.id)), self._info)
        return self._info

    async def resume(self, *, timeout: float | None = None) -> SandboxInfo:
        """Thaws a paused sandbox; ``timeout`` gives it a new time to live from now."""
        self._info = _with_tokens(await self._t.call(resume_op(self.id, timeout)), self._info)
        return self._info

    async def snapshot(self, name: str | None = None, *, memory: bool = False) -> Snapshot:
        """Snapshots the sandbox's files (see :meth:`Sandbox.snapshot`)."""
        return await self._t.call(snapshot_op(self.id, name, memory))

    async def fork(
        self,
        count: int = 1,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        memory: bool = False,
    ) -> ForkResult[AsyncSandbox]:
        """Copies the sandbox's files into ``count`` new sandboxes (see :meth:`Sandbox.fork`)."""
        made = await self._t.call(fork_op(self.id, count, timeout, metadata, memory))
        items: builtins.list[AsyncSandbox | MoatError] = []
        for info, err in made:
            if info is not None:
                items.append(self._sibling(info))
            else:
                assert err is not None
                items.append(err)
        return ForkResult(items)

    def _sibling(self, info: SandboxInfo) -> AsyncSandbox:
        if not self._owns:
            return AsyncSandbox(info, self._client)
        from .client import AsyncClient

        c = AsyncClient(url=self._client.url, api_key=self._client._api_key)
        return AsyncSandbox(info, c, owns_client=True)

    async def get_network(self) -> SandboxNetwork:
        """The sandbox's network policy, with its counters and latest refusals."""
        return await self._t.call(network_op(self.id))

    async def set_network(self, network: Network | Mapping[str, Any] | bool) -> SandboxNetwork:
        """Replaces the running sandbox's network policy (``False``: no network)."""
        return await self._t.call(network_op(self.id, network))

    async def exec(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
        on_stdout: _exec.OutputCallback | None = None,
        on_stderr: _exec.OutputCallback | None = None,
    ) -> ExecResult:
        """Runs ``command`` and returns its result once it ended (see :meth:`Sandbox.exec`);
        the callbacks may be coroutine functions."""
        body = _exec.exec_body(command, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        if on_stdout is not None or on_stderr is not None:
            return await _exec.arun_with_callbacks(await self._stream(body), on_stdout, on_stderr)
        return await self._t.call(
            Op(
                "POST",
                _path(self.id, "/exec"),
                parse_json(ExecResult.from_json),
                json=body,
                timeout=_exec.answer_timeout(body),
            )
        )

    async def exec_stream(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
    ) -> _exec.AsyncExecStream:
        """Starts ``command`` and returns its events as they happen: ``async for`` over the
        :class:`~moat.exec.AsyncExecStream`."""
        body = _exec.exec_body(command, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        return await self._stream(body)

    async def _stream(self, body: dict[str, Any]) -> _exec.AsyncExecStream:
        stack = AsyncExitStack()
        try:
            r = await stack.enter_async_context(
                self._t.stream(
                    "POST",
                    _path(self.id, "/exec"),
                    json_body=body,
                    headers={"Accept": _exec.NDJSON},
                    timeout=_exec.answer_timeout(body),
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        return _exec.AsyncExecStream(stack, r)

    async def run_code(
        self,
        code: str,
        *,
        language: str | None = None,
        context: CodeContext | str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_stdout: _exec.OutputCallback | None = None,
        on_stderr: _exec.OutputCallback | None = None,
        on_result: _code.ResultCallback | None = None,
        on_error: _code.ErrorCallback | None = None,
    ) -> Execution:
        """Runs ``code`` in a stateful code context (see :meth:`Sandbox.run_code`); the
        callbacks may be coroutine functions."""
        body = _code.execute_body(code, language, context, env)
        deadline = _code.Deadline(timeout)
        builder = _code.ExecutionBuilder()
        callbacks: dict[str, Any] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        try:
            async with self._t.stream(
                "POST",
                "/execute",
                json_body=body,
                headers=_code.headers(self._info),
                timeout=deadline.stream_timeout(),
                auth=False,
            ) as r:
                async for line in r.aiter_lines():
                    event = builder.feed(line)
                    if event is not None and callbacks[event[0]] is not None:
                        await _maybe_await(callbacks[event[0]](event[1]))
                    if builder.done:
                        break
                    deadline.check()
        except SandboxTimeoutError as e:
            if deadline.passed():
                raise deadline.error() from e
            raise
        return builder.finish()

    async def create_code_context(
        self, *, language: str | None = None, cwd: str | None = None
    ) -> CodeContext:
        """A new code context whose state is its own (see :meth:`Sandbox.create_code_context`)."""
        return await self._t.call(
            Op(
                "POST",
                "/contexts",
                parse_json(CodeContext.from_json),
                json=_code.context_body(language, cwd),
                headers=_code.headers(self._info),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    async def list_code_contexts(self) -> builtins.list[CodeContext]:
        """The sandbox's code contexts (the default ones among them)."""
        return await self._t.call(
            Op(
                "GET",
                "/contexts",
                lambda r: _code.contexts(answer_json(r)),
                headers=_code.headers(self._info),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    async def restart_code_context(self, context: CodeContext | str) -> None:
        """Restarts a code context: its state is gone."""
        ctx = _code.context_id(context)
        assert ctx is not None
        await self._t.call(
            Op(
                "POST",
                f"/contexts/{seg(ctx)}/restart",
                parse_none,
                json={},
                headers=_code.headers(self._info),
                ok=(200, 204),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    async def remove_code_context(self, context: CodeContext | str) -> None:
        """Removes a code context."""
        ctx = _code.context_id(context)
        assert ctx is not None
        await self._t.call(
            Op(
                "DELETE",
                f"/contexts/{seg(ctx)}",
                parse_none,
                headers=_code.headers(self._info),
                ok=(200, 204),
                timeout=_code.CALL_TIMEOUT,
                auth=False,
            )
        )

    async def close(self) -> None:
        """Closes this object's connection to the server (the sandbox runs on)."""
        if self._owns:
            await self._client.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.kill()
        except NotFoundError:
            pass
        finally:
            await self.close()
