"""Fixtures of the Google ADK integration suite (`moat.integrations.adk`) against a running
`moat serve`.

`crates/moat/tests/adk.rs` starts the server and runs pytest with the shared fixtures of
`tests/pylib/moat_suite.py` (`server`, `client`, `tag`). No test calls a model: ADK's flow is
driven with invocation contexts built as ADK's own unit tests build them, and with a model
that replays scripted replies (`adk_helpers.py`).
"""

from __future__ import annotations

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


