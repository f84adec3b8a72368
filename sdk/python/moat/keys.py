"""API keys (``client.keys``; admin keys only): make, list and revoke the keys of a tenant."""

from __future__ import annotations

import builtins
from typing import Any

from . import _args
from ._http import AsyncTransport, Op, SyncTransport, parse_json, seg
from .models import ApiKey, CreatedKey

__all__ = ["AsyncKeys", "Keys"]


def _create_op(
    name: str,
    role: str,
    tenant: str | None,
    max_sandboxes: int | None,
    max_memory: str | int | None,
    max_pids: int | None,
    max_snapshot_size: str | int | None,
    requests_per_minute: int | None,
) -> Op[CreatedKey]:
    if not isinstance(name, str) or not name:
        raise ValueError("a key needs a name")
    if role not in ("user", "admin"):
        raise ValueError(f"role must be 'user' or 'admin', not {role!r}")
    body: dict[str, Any] = {"name": name, "role": role}
    if _args.optional_str("tenant", tenant) is not None:
        body["tenant"] = tenant
    quotas: dict[str, Any] = {}
    for qname, value in (
        ("max_sandboxes", max_sandboxes),
        ("max_pids", max_pids),
        ("requests_per_minute", requests_per_minute),
    ):
        if _args.count(qname, value) is not None:
            quotas[qname] = value
    for qname, size in (("max_memory", max_memory), ("max_snapshot_size", max_snapshot_size)):
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, (str, int)):
                raise TypeError(f"{qname} must be a size string or a number of bytes")
            quotas[qname] = str(size)
    if quotas:
        body["quotas"] = quotas
    return Op("POST", "/v1/keys", parse_json(CreatedKey.from_json), json=body, ok=(201,))


def _tenant(tenant: str | None) -> list[tuple[str, str]]:
    return (
        [("tenant", tenant)] if _args.optional_str("tenant", tenant) is not None and tenant else []
    )


def _list_op(tenant: str | None) -> Op[list[ApiKey]]:
    return Op(
        "GET",
        "/v1/keys",
        parse_json(lambda j: [ApiKey.from_json(k) for k in j["keys"]]),
        params=_tenant(tenant),
    )


def _revoke_op(key_id: str, tenant: str | None) -> Op[ApiKey]:
    return Op(
        "DELETE", f"/v1/keys/{seg(key_id)}", parse_json(ApiKey.from_json), params=_tenant(tenant)
    )


class Keys:
    """API keys, for admin keys (any other key gets ``PermissionDeniedError``)."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def create(
        self,
        name: str,
        *,
        role: str = "user",
        tenant: str | None = None,
        max_sandboxes: int | None = None,
        max_memory: str | int | None = None,
        max_pids: int | None = None,
        max_snapshot_size: str | int | None = None,
        requests_per_minute: int | None = None,
    ) -> CreatedKey:
        """Makes a key for ``tenant`` (the caller's when absent; made if new) with the quotas
        given; its ``secret`` is in this answer only."""
        return self._t.call(
            _create_op(
                name,
                role,
                tenant,
                max_sandboxes,
                max_memory,
                max_pids,
                max_snapshot_size,
                requests_per_minute,
            )
        )

    def list(self, *, tenant: str | None = None) -> builtins.list[ApiKey]:
        """The tenant's keys, revoked ones included, oldest first."""
        return self._t.call(_list_op(tenant))

    def revoke(self, key_id: str, *, tenant: str | None = None) -> ApiKey:
        """Revokes the key ``key_id``: it answers ``AuthenticationError`` from then on."""
        return self._t.call(_revoke_op(key_id, tenant))


class AsyncKeys:
    """API keys, for admin keys (async)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def create(
        self,
        name: str,
        *,
        role: str = "user",
        tenant: str | None = None,
        max_sandboxes: int | None = None,
        max_memory: str | int | None = None,
        max_pids: int | None = None,
        max_snapshot_size: str | int | None = None,
        requests_per_minute: int | None = None,
    ) -> CreatedKey:
        """Makes a key (see :meth:`Keys.create`)."""
        return await self._t.call(
            _create_op(
                name,
                role,
                tenant,
                max_sandboxes,
                max_memory,
                max_pids,
                max_snapshot_size,
                requests_per_minute,
            )
        )

    async def list(self, *, tenant: str | None = None) -> builtins.list[ApiKey]:
        """The tenant's keys, revoked ones included, oldest first."""
        return await self._t.call(_list_op(tenant))

    async def revoke(self, key_id: str, *, tenant: str | None = None) -> ApiKey:
        """Revokes the key ``key_id``."""
        return await self._t.call(_revoke_op(key_id, tenant))
