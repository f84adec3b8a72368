"""Fixtures the suites of moat's own Python packages share (`tests/sdk`, `tests/adk`,
`tests/mcp`), loaded as a pytest plugin (`-p moat_suite`) by `moat_test_support::pytest`.

The server comes from the environment, as the SDK reads it: `MOAT_URL` (`http://127.0.0.1:PORT`)
and `MOAT_API_KEY` (an admin key). The Rust test that runs a suite starts the server and runs
pytest with them; these fixtures never start one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import moat

ENV_VARS = ("MOAT_URL", "MOAT_API_KEY")


@pytest.fixture(scope="session")
def server() -> tuple[str, str]:
    """The server's URL and the admin key."""
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} unset: run this suite through its test in crates/moat/tests "
            "(`cargo nextest run -p moat --test python_sdk`, `adk` or `mcp`), which starts "
            "moat serve"
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
