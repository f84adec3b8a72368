"""Fixtures of the E2B SDK suite: the unmodified `e2b` and `e2b-code-interpreter` SDKs against a
running `moat serve`.

The server comes from the environment, as the SDKs read it: `E2B_API_URL` and `E2B_SANDBOX_URL`
(both `http://127.0.0.1:PORT`, the one listener) and `E2B_API_KEY` (a key moat issued).
`crates/moat/tests/e2b_sdk.rs` starts the server, makes the key and runs pytest with them.
"""

import os
import uuid
from dataclasses import dataclass

import pytest

ENV_VARS = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")


@dataclass(frozen=True)
class Moat:
    """Where the server under test is and the key to use."""

    api_url: str
    sandbox_url: str
    api_key: str


@pytest.fixture(scope="session")
def moat() -> Moat:
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} unset: run this suite through "
            "`cargo nextest run -p moat --test e2b_sdk`, which starts moat serve"
        )
    return Moat(
        api_url=os.environ["E2B_API_URL"],
        sandbox_url=os.environ["E2B_SANDBOX_URL"],
        api_key=os.environ["E2B_API_KEY"],
    )


@pytest.fixture
def tag(moat: Moat) -> str:
    """A label unique to one test, for its sandboxes' metadata, so listings see only them."""
    return uuid.uuid4().hex[:12]
