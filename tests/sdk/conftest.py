"""Fixtures of the suite of moat's own Python SDK (`sdk/python`, the `moat` package) against a
running `moat serve`.

The server comes from the environment, as the SDK reads it: `MOAT_URL` (`http://127.0.0.1:PORT`)
and `MOAT_API_KEY` (an admin key). `crates/moat/tests/python_sdk.rs` starts the server and runs
pytest with them; these fixtures never start one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import moat

ENV_VARS = ("MOAT_URL", "MOAT_API_KEY")


@pytest.fixture(scope="session")
def server() -> tuple[str, str]:
    """The server's URL and the admin key."""
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} unset: run this suite through "
            "`cargo nextest run -p moat --test python_sdk`, which starts moat serve"
        )
    return os.environ["MOAT_URL"], os.environ["MOAT_API_KEY"]


@pytest.fixture(scope="session")
def client(server: tuple[str, str]) -> Iterator[moat.Client]:
    """A client with the admin key, shared by the session."""
    with moat.Client() as c:
        yield c


@pytest.fixture
def tag() -> str:
    """A label unique to one test, for its sandboxes' metadata, so listings see only them."""
    return uuid.uuid4().hex[:12]


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
