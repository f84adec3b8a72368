"""Templates (``client.templates``): what sandboxes are made from, with their warm pools."""

from __future__ import annotations

import builtins
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _args
from ._http import AsyncTransport, Op, SyncTransport, parse_json, parse_none, seg
from .errors import MoatError, error_for
from .models import Network, PullEvent, Resources, Template, TemplateSpec

__all__ = ["AsyncTemplates", "PullCallback", "Templates"]

#: Called with each step of an image's pull; an async client's may be a coroutine function.
PullCallback = Callable[[PullEvent], Any]

# An image's pull may take a while before the template's answer.
_CREATE_TIMEOUT = 1800.0


def _spec(
    spec: TemplateSpec | Mapping[str, Any] | None,
    image: str | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    given = {k: v for k, v in fields.items() if v is not None}
    if spec is not None:
        if given or image is not None:
            raise ValueError("give a spec or its fields (image=, resources=, ...), not both")
        if isinstance(spec, TemplateSpec):
            return spec.to_json()
        if isinstance(spec, Mapping):
            # A mapping goes as it is: the server checks it (unknown fields are refused).
            return dict(spec)
        raise TypeError(f"spec must be a TemplateSpec or a mapping, not {type(spec).__name__}")
    if image is not None:
        if "rootfs" in given:
            raise ValueError("give image= or rootfs=, not both")
        given["rootfs"] = {"image": _args.optional_str("image", image)}
    for name in ("resources", "max_resources"):
        if name in given:
            given[name] = Resources.coerce(given[name])
    if "network" in given:
        given["network"] = Network.coerce(given["network"])
    if "env" in given:
        given["env"] = _args.mapping("env", given["env"])
    for name in ("ready_timeout_secs", "timeout_secs"):
        if name in given:
            given[name] = _args.seconds(name.removesuffix("_secs"), given[name])
    return TemplateSpec(**given).to_json()


def create_body(
    name: str,
    spec: TemplateSpec | Mapping[str, Any] | None,
    image: str | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """The ``CreateTemplate`` JSON."""
    if not isinstance(name, str) or not name:
        raise ValueError("a template needs a name")
    return {"name": name, "spec": _spec(spec, image, fields)}


def _line(raw: str) -> dict[str, Any] | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise MoatError(
            f"the server sent a line that is not JSON: {raw[:200]!r}", code="bad_answer"
        ) from e
    return value if isinstance(value, dict) else None


def _final(msg: dict[str, Any]) -> Template | None:
    """The template of the last line, or the error it carries (raised)."""
    kind = msg.get("type")
    if kind == "template":
        return Template.from_json(msg["template"])
    if kind == "error":
        raise error_for(None, msg.get("code"), str(msg.get("message", "the pull failed")))
    return None


def _unfinished() -> MoatError:
    return MoatError("the server's answer ended before the template was made", code="stream_ended")


def _list_op() -> Op[list[Template]]:
    return Op(
        "GET",
        "/v1/templates",
        parse_json(lambda j: [Template.from_json(t) for t in j["templates"]]),
    )


def _get_op(name: str) -> Op[Template]:
    return Op("GET", f"/v1/templates/{seg(name)}", parse_json(Template.from_json))


def _tag_op(name: str, tags: str | Sequence[str]) -> Op[list[Template]]:
    if isinstance(tags, str):
        tags = [tags]
    if not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be strings")
    return Op(
        "POST",
        f"/v1/templates/{seg(name)}/tags",
        parse_json(lambda j: [Template.from_json(t) for t in j["templates"]]),
        json={"tags": list(tags)},
    )


def _delete_op(name: str, force: bool) -> Op[None]:
    params = [("force", "true")] if force else []
    return Op("DELETE", f"/v1/templates/{seg(name)}", parse_none, params=params, ok=(204,))


class Templates:
    """The templates the key's tenant sees: the built-ins and its own."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self,
        name: str,
        spec: TemplateSpec | Mapping[str, Any] | None = None,
        *,
        image: str | None = None,
        rootfs: str | dict[str, str] | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        max_resources: Resources | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        workdir: str | None = None,
        start: str | None = None,
        ready: str | None = None,
        ready_timeout: float | None = None,
        timeout: float | None = None,
        pool_size: int | None = None,
        backend: str | None = None,
        snapshot: str | None = None,
        network: Network | Mapping[str, Any] | bool | None = None,
        on_progress: PullCallback | None = None,
    ) -> Template:
        """Defines a template ``name`` from ``spec``, or from the fields given.

        ``image`` makes it from an OCI image (``python:3.12-slim``), which the server pulls
        before answering; ``on_progress`` then sees the pull as it goes. ``pool_size`` keeps
        that many sandboxes booted ahead of demand (the warm pool: see ``Template.pool``).
        ``timeout`` is its sandboxes' time to live when a create names none.
        """
        body = create_body(
            name,
            spec,
            image,
            dict(
                rootfs=rootfs,
                resources=resources,
                max_resources=max_resources,
                env=env,
                user=user,
                workdir=workdir,
                start=start,
                ready=ready,
                ready_timeout_secs=ready_timeout,
                timeout_secs=timeout,
                pool_size=pool_size,
                backend=backend,
                snapshot=snapshot,
                network=network,
            ),
        )
        if on_progress is None:
            return self._t.call(
                Op(
                    "POST",
                    "/v1/templates",
                    parse_json(Template.from_json),
                    json=body,
                    ok=(201,),
                    timeout=_CREATE_TIMEOUT,
                )
            )
        with self._t.stream(
            "POST",
            "/v1/templates",
            json_body=body,
            headers={"Accept": "application/x-ndjson"},
            timeout=_CREATE_TIMEOUT,
        ) as r:
            if r.status_code == 201:
                # An answer without a stream: the template made at once.
                r.read()
                return Template.from_json(r.json())
            for raw in r.iter_lines():
                msg = _line(raw)
                if msg is None:
                    continue
                template = _final(msg)
                if template is not None:
                    return template
                on_progress(PullEvent.from_json(msg))
        raise _unfinished()

    def list(self) -> builtins.list[Template]:
        """The templates, by name."""
        return self._t.call(_list_op())

    def get(self, name: str) -> Template:
        """The template ``name``, with its warm pool's state."""
        return self._t.call(_get_op(name))

    def tag(self, name: str, tags: str | Sequence[str]) -> builtins.list[Template]:
        """Copies the template ``name`` (``name`` or ``name:tag``) to each of ``tags`` of its
        name (``name:tag``; ``default`` is the name alone), moving tags that exist; the
        templates written."""
        return self._t.call(_tag_op(name, tags))

    def delete(self, name: str, *, force: bool = False) -> None:
        """Deletes the template and its warm pool; refused (``ConflictError``) while
        sandboxes of it run, unless ``force`` (they then keep running)."""
        self._t.call(_delete_op(name, force))


class AsyncTemplates:
    """The templates the key's tenant sees (async)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        name: str,
        spec: TemplateSpec | Mapping[str, Any] | None = None,
        *,
        image: str | None = None,
        rootfs: str | dict[str, str] | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        max_resources: Resources | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        workdir: str | None = None,
        start: str | None = None,
        ready: str | None = None,
        ready_timeout: float | None = None,
        timeout: float | None = None,
        pool_size: int | None = None,
        backend: str | None = None,
        snapshot: str | None = None,
        network: Network | Mapping[str, Any] | bool | None = None,
        on_progress: PullCallback | None = None,
    ) -> Template:
        """Defines a template (see :meth:`Templates.create`)."""
        body = create_body(
            name,
            spec,
            image,
            dict(
                rootfs=rootfs,
                resources=resources,
                max_resources=max_resources,
                env=env,
                user=user,
                workdir=workdir,
                start=start,
                ready=ready,
                ready_timeout_secs=ready_timeout,
                timeout_secs=timeout,
                pool_size=pool_size,
                backend=backend,
                snapshot=snapshot,
                network=network,
            ),
        )
        if on_progress is None:
            return await self._t.call(
                Op(
                    "POST",
                    "/v1/templates",
                    parse_json(Template.from_json),
                    json=body,
                    ok=(201,),
                    timeout=_CREATE_TIMEOUT,
                )
            )
        async with self._t.stream(
            "POST",
            "/v1/templates",
            json_body=body,
            headers={"Accept": "application/x-ndjson"},
            timeout=_CREATE_TIMEOUT,
        ) as r:
            if r.status_code == 201:
                await r.aread()
                return Template.from_json(r.json())
            async for raw in r.aiter_lines():
                msg = _line(raw)
                if msg is None:
                    continue
                template = _final(msg)
                if template is not None:
                    return template
                out = on_progress(PullEvent.from_json(msg))
                if inspect.isawaitable(out):
                    await out
        raise _unfinished()

    async def list(self) -> builtins.list[Template]:
        """The templates, by name."""
        return await self._t.call(_list_op())

    async def get(self, name: str) -> Template:
        """The template ``name``, with its warm pool's state."""
        return await self._t.call(_get_op(name))

    async def tag(self, name: str, tags: str | Sequence[str]) -> builtins.list[Template]:
        """Copies the template to tags of its name (see :meth:`Templates.tag`)."""
        return await self._t.call(_tag_op(name, tags))

    async def delete(self, name: str, *, force: bool = False) -> None:
        """Deletes the template and its warm pool (see :meth:`Templates.delete`)."""
        await self._t.call(_delete_op(name, force))
