"""Template builds from a Dockerfile (``client.builds``).

A build context is a local directory: the SDK archives it (entries in name order, what its
``.dockerignore`` names left out), uploads it unless the server has it already (archives are
named by their SHA-256), and starts the build, which runs on the server; :meth:`Builds.wait`
follows its log until it ends.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import _args, _tar
from ._http import AsyncTransport, Op, SyncTransport, parse_json, parse_none, seg
from .errors import NotFoundError, SandboxTimeoutError
from .models import Build, BuildLogs, Network, Resources

__all__ = ["AsyncBuilds", "Builds", "LogCallback"]

#: Called with each new piece of a build's log; an async client's may be a coroutine function.
LogCallback = Callable[[str], Any]

#: Longest a build may take, seconds.
MAX_BUILD_TIMEOUT = 7200


class _Context:
    """A local directory as a build context archive, with its digest."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        root = Path(directory)
        ignore = _tar.DockerIgnore.of(root)
        self.source = _tar.TarSource(root, ignore.excluded if ignore is not None else None)
        h = hashlib.sha256()
        for chunk in self.source.chunks():
            h.update(chunk)
        self.digest = "sha256:" + h.hexdigest()

    def has_op(self) -> Op[None]:
        return Op("HEAD", f"/v1/build-contexts/{seg(self.digest)}", parse_none)

    def put_op(self, progress: Any) -> Op[None]:
        return Op(
            "PUT",
            f"/v1/build-contexts/{seg(self.digest)}",
            parse_none,
            content=progress,
            headers={"Content-Type": "application/x-tar", "Content-Length": str(self.source.size)},
            ok=(200, 201),
        )


def _dockerfile(
    dockerfile: str | None, dockerfile_path: str | os.PathLike[str] | None, context: Any
) -> str:
    if dockerfile is not None and dockerfile_path is not None:
        raise ValueError("give dockerfile (its text) or dockerfile_path, not both")
    if dockerfile is not None:
        if not isinstance(dockerfile, str) or not dockerfile.strip():
            raise ValueError("dockerfile must be the Dockerfile's text")
        return dockerfile
    if dockerfile_path is None:
        if context is None:
            raise ValueError(
                "give the Dockerfile: dockerfile=TEXT, dockerfile_path=PATH, "
                "or a context with a Dockerfile"
            )
        dockerfile_path = Path(context) / "Dockerfile"
    return Path(dockerfile_path).read_text(encoding="utf-8")


def _tags(tags: Any) -> list[str]:
    """``tags`` as the list the server takes: a string is one tag."""
    if isinstance(tags, str):
        return [tags]
    if not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be strings")
    return list(tags)


def _body(
    template: str,
    dockerfile: str,
    context: str | None,
    contexts: dict[str, str],
    fields: dict[str, Any],
) -> dict[str, Any]:
    if not isinstance(template, str) or not template:
        raise ValueError("a build needs the name of the template it makes")
    body: dict[str, Any] = {"template": template, "dockerfile": dockerfile}
    if context is not None:
        body["context"] = context
    if contexts:
        body["contexts"] = contexts
    for name in ("args", "from_templates"):
        if fields[name]:
            body[name] = _args.mapping(name, fields[name])
    if fields["tags"]:
        body["tags"] = _tags(fields["tags"])
    for name in ("backend", "start", "ready"):
        if _args.optional_str(name, fields[name]) is not None:
            body[name] = fields[name]
    res = Resources.coerce(fields["resources"])
    if res is not None:
        body["resources"] = res.to_json()
    net = Network.coerce(fields["network"])
    if net is not None:
        body["network"] = net.to_json()
    secs = _args.seconds("timeout", fields["timeout"], maximum=MAX_BUILD_TIMEOUT)
    if secs is not None:
        body["timeout_secs"] = secs
    if fields["no_cache"]:
        body["no_cache"] = True
    return body


def _named_contexts(contexts: Mapping[str, str | os.PathLike[str]] | None) -> dict[str, _Context]:
    if contexts is None:
        return {}
    if not isinstance(contexts, Mapping):
        raise TypeError("contexts must map names to local directories")
    return {str(name): _Context(path) for name, path in contexts.items()}


def _create_op(body: dict[str, Any]) -> Op[Build]:
    return Op("POST", "/v1/builds", parse_json(Build.from_json), json=body, ok=(202,))


def _get_op(build_id: str) -> Op[Build]:
    return Op("GET", f"/v1/builds/{seg(build_id)}", parse_json(Build.from_json))


def _list_op() -> Op[list[Build]]:
    return Op("GET", "/v1/builds", parse_json(lambda j: [Build.from_json(b) for b in j["builds"]]))


def _logs_op(build_id: str, offset: int) -> Op[BuildLogs]:
    _args.count("offset", offset, minimum=0)
    return Op(
        "GET",
        f"/v1/builds/{seg(build_id)}/logs",
        parse_json(BuildLogs.from_json),
        params=[("offset", str(offset))],
    )


def _cancel_op(build_id: str) -> Op[Build]:
    return Op("POST", f"/v1/builds/{seg(build_id)}/cancel", parse_json(Build.from_json), json={})


def _delete_op(build_id: str) -> Op[None]:
    return Op("DELETE", f"/v1/builds/{seg(build_id)}", parse_none, ok=(204,))


def _check_poll(poll_interval: float) -> float:
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, (int, float))
        or poll_interval <= 0
    ):
        raise ValueError("poll_interval must be a positive number of seconds")
    return float(poll_interval)


def _deadline(timeout: float | None) -> float | None:
    _args.seconds("timeout", timeout)
    return None if timeout is None else time.monotonic() + timeout


def _timed_out(what: str) -> SandboxTimeoutError:
    return SandboxTimeoutError(f"{what} was not over within the time given", code="wait_timeout")


class Builds:
    """Template builds of the key's tenant."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def upload_context(self, directory: str | os.PathLike[str]) -> str:
        """Archives and uploads ``directory`` as a build context (unless the server has it);
        its digest (``sha256:…``)."""
        return self._upload(_Context(directory))

    def _upload(self, ctx: _Context) -> str:
        try:
            self._t.call(ctx.has_op())
        except NotFoundError:
            self._t.call(ctx.put_op(ctx.source.chunks()))
        return ctx.digest

    def create(
        self,
        template: str,
        context: str | os.PathLike[str] | None = None,
        *,
        dockerfile: str | None = None,
        dockerfile_path: str | os.PathLike[str] | None = None,
        args: Mapping[str, str] | None = None,
        contexts: Mapping[str, str | os.PathLike[str]] | None = None,
        from_templates: Mapping[str, str] | None = None,
        backend: str | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        network: Network | Mapping[str, Any] | bool | None = None,
        timeout: float | None = None,
        no_cache: bool = False,
        start: str | None = None,
        ready: str | None = None,
        tags: str | Sequence[str] | None = None,
    ) -> Build:
        """Starts building the template ``template``; the build, ``queued``.

        ``context`` is the local directory ``COPY`` and ``ADD`` read (none: an empty
        context). The Dockerfile is ``dockerfile`` (its text), the file ``dockerfile_path``,
        or else ``context/Dockerfile``. ``contexts`` are named contexts (``COPY --from=NAME``),
        ``from_templates`` lets ``FROM NAME`` start from a template's image, ``args`` are the
        ``ARG`` values, ``resources`` and ``network`` those of the ``RUN`` steps; ``start``
        and ``ready`` become the template's scripts. ``template`` may carry a tag
        (``"app:v1"``) and ``tags`` names more tags of its name the build writes too.
        Follow it with :meth:`wait`.
        """
        text = _dockerfile(dockerfile, dockerfile_path, context)
        digest = self.upload_context(context) if context is not None else None
        named = {name: self._upload(ctx) for name, ctx in _named_contexts(contexts).items()}
        fields = dict(
            args=args,
            from_templates=from_templates,
            backend=backend,
            resources=resources,
            network=network,
            timeout=timeout,
            no_cache=no_cache,
            start=start,
            ready=ready,
            tags=tags,
        )
        return self._t.call(_create_op(_body(template, text, digest, named, fields)))

    def get(self, build_id: str) -> Build:
        """The build ``build_id``."""
        return self._t.call(_get_op(build_id))

    def list(self) -> builtins.list[Build]:
        """The tenant's builds, newest first."""
        return self._t.call(_list_op())

    def logs(self, build_id: str, *, offset: int = 0) -> BuildLogs:
        """The build's log from byte ``offset`` (at most 1 MiB a call)."""
        return self._t.call(_logs_op(build_id, offset))

    def cancel(self, build_id: str) -> Build:
        """Cancels a queued or running build."""
        return self._t.call(_cancel_op(build_id))

    def delete(self, build_id: str) -> None:
        """Removes a finished build's record and log (``ConflictError`` while it runs)."""
        self._t.call(_delete_op(build_id))

    def wait(
        self,
        build_id: str,
        *,
        timeout: float | None = None,
        on_log: LogCallback | None = None,
        poll_interval: float = 0.5,
    ) -> Build:
        """Follows the build until it is over, handing its log to ``on_log`` as it grows; the
        final build (which may have ``failed``: see ``status`` and ``error``). Past
        ``timeout`` seconds raises :class:`~moat.errors.SandboxTimeoutError` (the build goes
        on)."""
        interval = _check_poll(poll_interval)
        deadline = _deadline(timeout)
        offset = 0
        while True:
            logs = self.logs(build_id, offset=offset)
            if logs.text and on_log is not None:
                on_log(logs.text)
            moved = logs.next_offset != offset
            offset = logs.next_offset
            if logs.done:
                return self.get(build_id)
            if deadline is not None and time.monotonic() > deadline:
                raise _timed_out(f"build {build_id}")
            if not moved:
                time.sleep(interval)


class AsyncBuilds:
    """Template builds of the key's tenant (async)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def upload_context(self, directory: str | os.PathLike[str]) -> str:
        """Archives and uploads ``directory`` as a build context; its digest."""
        ctx = await asyncio.to_thread(_Context, directory)
        return await self._upload(ctx)

    async def _upload(self, ctx: _Context) -> str:
        try:
            await self._t.call(ctx.has_op())
        except NotFoundError:

            async def chunks() -> Any:
                # Read (and archived) on a thread, off the event loop.
                source = ctx.source.chunks()
                while (chunk := await asyncio.to_thread(next, source, None)) is not None:
                    yield chunk

            await self._t.call(ctx.put_op(chunks()))
        return ctx.digest

    async def create(
        self,
        template: str,
        context: str | os.PathLike[str] | None = None,
        *,
        dockerfile: str | None = None,
        dockerfile_path: str | os.PathLike[str] | None = None,
        args: Mapping[str, str] | None = None,
        contexts: Mapping[str, str | os.PathLike[str]] | None = None,
        from_templates: Mapping[str, str] | None = None,
        backend: str | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        network: Network | Mapping[str, Any] | bool | None = None,
        timeout: float | None = None,
        no_cache: bool = False,
        start: str | None = None,
        ready: str | None = None,
        tags: str | Sequence[str] | None = None,
    ) -> Build:
        """Starts building the template ``template`` (see :meth:`Builds.create`)."""
        text = _dockerfile(dockerfile, dockerfile_path, context)
        digest = await self.upload_context(context) if context is not None else None
        # Archiving and hashing directories: off the event loop.
        named_contexts = await asyncio.to_thread(_named_contexts, contexts)
        named = {name: await self._upload(ctx) for name, ctx in named_contexts.items()}
        fields = dict(
            args=args,
            from_templates=from_templates,
            backend=backend,
            resources=resources,
            network=network,
            timeout=timeout,
            no_cache=no_cache,
            start=start,
            ready=ready,
            tags=tags,
        )
        return await self._t.call(_create_op(_body(template, text, digest, named, fields)))

    async def get(self, build_id: str) -> Build:
        """The build ``build_id``."""
        return await self._t.call(_get_op(build_id))

    async def list(self) -> builtins.list[Build]:
        """The tenant's builds, newest first."""
        return await self._t.call(_list_op())

    async def logs(self, build_id: str, *, offset: int = 0) -> BuildLogs:
        """The build's log from byte ``offset``."""
        return await self._t.call(_logs_op(build_id, offset))

    async def cancel(self, build_id: str) -> Build:
        """Cancels a queued or running build."""
        return await self._t.call(_cancel_op(build_id))

    async def delete(self, build_id: str) -> None:
        """Removes a finished build's record and log."""
        await self._t.call(_delete_op(build_id))

    async def wait(
        self,
        build_id: str,
        *,
        timeout: float | None = None,
        on_log: LogCallback | None = None,
        poll_interval: float = 0.5,
    ) -> Build:
        """Follows the build until it is over (see :meth:`Builds.wait`)."""
        interval = _check_poll(poll_interval)
        deadline = _deadline(timeout)
        offset = 0
        while True:
            logs = await self.logs(build_id, offset=offset)
            if logs.text and on_log is not None:
                out = on_log(logs.text)
                if inspect.isawaitable(out):
                    await out
            moved = logs.next_offset != offset
            offset = logs.next_offset
            if logs.done:
                return await self.get(build_id)
            if deadline is not None and time.monotonic() > deadline:
                raise _timed_out(f"build {build_id}")
            if not moved:
                await asyncio.sleep(interval)
