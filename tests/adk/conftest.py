"""Fixtures of the Google ADK integration suite (`moat.integrations.adk`) against a running
`moat serve`.

The server comes from the environment: `MOAT_URL` (`http://127.0.0.1:PORT`) and `MOAT_API_KEY`
(an admin key). `crates/moat/tests/adk.rs` starts the server and runs pytest with them; these
fixtures never start one. No test calls a model: ADK's flow is driven with invocation contexts
built as ADK's own unit tests build them, and with a model that replays scripted replies
(`adk_helpers.py`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import MagicMock

import pytest
from google.adk.agents.base_agent import BaseAgent
from google.adk.agents.invocation_context import InvocationContext
from google.adk.sessions.base_session_service import BaseSessionService
from google.adk.sessions.session import Session

import moat
from moat.integrations.adk import MoatCodeExecutor

ENV_VARS = ("MOAT_URL", "MOAT_API_KEY")


@pytest.fixture(scope="session")
def server() -> tuple[str, str]:
    """The server's URL and the admin key."""
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} unset: run this suite through "
            "`cargo nextest run -p moat --test adk`, which starts moat serve"
        )
    return os.environ["MOAT_URL"], os.environ["MOAT_API_KEY"]


@pytest.fixture(scope="session")
def client(server: tuple[str, str]) -> Iterator[moat.Client]:
    """A client with the admin key, shared by the session, to look at what the adapters made."""
    with moat.Client() as c:
        yield c


@pytest.fixture
def tag() -> str:
    """A label unique to one test, put on its sandboxes' metadata so listings see only them."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def make_executor(server: tuple[str, str], tag: str) -> Iterator[Callable[..., MoatCodeExecutor]]:
    """Makes executors whose sandboxes carry the test's tag; closes them after the test."""
    made: list[MoatCodeExecutor] = []

    def make(**settings: Any) -> MoatCodeExecutor:
        metadata = {"test": tag, **settings.pop("metadata", {})}
        executor = MoatCodeExecutor(metadata=metadata, **settings)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()


@pytest.fixture
def mock_context() -> InvocationContext:
    """An invocation context as ADK's executor unit tests make one: the executor gets it but
    needs nothing from it."""
    return InvocationContext(
        invocation_id="test_invocation",
        agent=MagicMock(spec=BaseAgent),
        session=MagicMock(spec=Session),
        session_service=MagicMock(spec=BaseSessionService),
    )


