"""Snapshots (``client.snapshots``): frozen copies of sandboxes' files, from which new
sandboxes start (``Sandbox.create(snapshot=...)``); ``sandbox.snapshot()`` takes one."""

from __future__ import annotations

import builtins
from typing import Any

from . import _args
from ._http import AsyncTransport, Op, SyncTransport, parse_json, parse_none, seg
from .models import Snapshot

__all__ = ["AsyncSnapshots", "Snapshots"]


def _list_op(
    sandbox_id: str | None, name: str | None, after: str | None, page: int
) -> Op[tuple[list[Snapshot], str | None]]:
    params: list[tuple[str, str]] = []
    if _args.optional_str("sandbox_id", sandbox_id) is not None:
        params.append(("sandbox_id", str(sandbox_id)))
    if _args.optional_str("name", name) is not None:
        params.append(("name", str(name)))
    if after is not None:
        params.append(("after", after))
    params.append(("limit", str(page)))

    def parse(j: Any) -> tuple[list[Snapshot], str | None]:
        return [Snapshot.from_json(s) for s in j["snapshots"]], j.get("next")

    return Op("GET", "/v1/snapshots", parse_json(parse), params=params)


def _page(limit: int | None) -> int:
    _args.count("limit", limit)
    return min(limit or 1000, 1000)


def _get_op(snapshot_id: str) -> Op[Snapshot]:
    return Op("GET", f"/v1/snapshots/{seg(snapshot_id)}", parse_json(Snapshot.from_json))


def _delete_op(snapshot_id: str) -> Op[None]:
    return Op("DELETE", f"/v1/snapshots/{seg(snapshot_id)}", parse_none, ok=(204,))


class Snapshots:
    """The tenant's snapshots."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def list(
        self, *, sandbox_id: str | None = None, name: str | None = None, limit: int | None = None
    ) -> builtins.list[Snapshot]:
        """The snapshots, oldest first: those of ``sandbox_id``, named ``name``, at most
        ``limit``."""
        out: builtins.list[Snapshot] = []
        after: str | None = None
        while True:
            items, after = self._t.call(_list_op(sandbox_id, name, after, _page(limit)))
            out.extend(items)
            if after is None or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    def get(self, snapshot_id: str) -> Snapshot:
        """The snapshot ``snapshot_id``."""
        return self._t.call(_get_op(snapshot_id))

    def delete(self, snapshot_id: str) -> None:
        """Deletes the snapshot and its stored copy (sandboxes made from it stay)."""
        self._t.call(_delete_op(snapshot_id))


class AsyncSnapshots:
    """The tenant's snapshots (async)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def list(
        self, *, sandbox_id: str | None = None, name: str | None = None, limit: int | None = None
    ) -> builtins.list[Snapshot]:
        """The snapshots, oldest first (see :meth:`Snapshots.list`)."""
        out: builtins.list[Snapshot] = []
        after: str | None = None
        while True:
            items, after = await self._t.call(_list_op(sandbox_id, name, after, _page(limit)))
            out.extend(items)
            if after is None or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    async def get(self, snapshot_id: str) -> Snapshot:
        """The snapshot ``snapshot_id``."""
        return await self._t.call(_get_op(snapshot_id))

    async def delete(self, snapshot_id: str) -> None:
        """Deletes the snapshot and its stored copy."""
        await self._t.call(_delete_op(snapshot_id))
