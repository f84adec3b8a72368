"""Fixtures of the suite of moat's own Python SDK (`sdk/python`, the `moat` package) against a
running `moat serve`.

`crates/moat/tests/python_sdk.rs` starts the server and runs pytest with the shared fixtures
of `tests/pylib/moat_suite.py` (`server`, `client`, `tag`); these build on them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import moat


@pytest.fixture
def sandbox(client: moat.Client, tag: str) -> Iterator[moat.Sandbox]:
    """A running sandbox of the default template, killed after the test."""
    sbx = moat.Sandbox.create(client=client, timeout=120, metadata={"test": tag})
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest_asyncio.fixture
async def aclient(server: tuple[str, str]) -> AsyncIterator[moat.AsyncClient]:
    """An async client with the admin key (one per test: each has its own event loop)."""
    async with moat.AsyncClient() as c:
        yield c


@pytest_asyncio.fixture
async def asandbox(aclient: moat.AsyncClient, tag: str) -> AsyncIterator[moat.AsyncSandbox]:
    """A running sandbox through the async client, killed after the test."""
    sbx = await moat.AsyncSandbox.create(client=aclient, timeout=120, metadata={"test": tag})
    try:
        yield sbx
    finally:
        await sbx.kill()


@pytest.fixture
def user_key(client: moat.Client) -> Iterator[moat.CreatedKey]:
    """A user key of a tenant of its own that may have one sandbox at a time."""
    key = client.keys.create("sdk suite", tenant="sdk" + uuid.uuid4().hex[:12], max_sandboxes=1)
    try:
        yield key
    finally:
        client.keys.revoke(key.id, tenant=key.tenant)
