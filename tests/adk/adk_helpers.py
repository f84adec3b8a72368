"""Helpers of the Google ADK integration suite: what ADK's flow is driven with, and what is
looked at on the server afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

from google.adk.agents.base_agent import BaseAgent
from google.adk.agents.invocation_context import InvocationContext
from google.adk.artifacts import InMemoryArtifactService
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.sessions.in_memory_session_service import InMemorySessionService
from google.genai import types

import moat


def live_sandboxes(client: moat.Client, tag: str) -> list[moat.SandboxInfo]:
    """The test's sandboxes that are starting or running."""
    return moat.Sandbox.list(state=["starting", "running"], metadata={"test": tag}, client=client)


def state_of(client: moat.Client, sandbox_id: str) -> str:
    """The state of sandbox `sandbox_id` now."""
    return moat.Sandbox.connect(sandbox_id, client=client).info().state


async def invocation_context(agent: BaseAgent) -> InvocationContext:
    """A real invocation context for `agent`, with in-memory session and artifact services, as
    ADK's flow unit tests make one: what the flow hands the executor."""
    session_service = InMemorySessionService()
    session = await session_service.create_session(app_name="adk_suite", user_id="tester")
    return InvocationContext(
        invocation_id="inv-" + uuid.uuid4().hex[:8],
        agent=agent,
        session=session,
        session_service=session_service,
        artifact_service=InMemoryArtifactService(),
    )


def model_says(*parts: types.Part) -> LlmResponse:
    """A model's reply made of `parts`."""
    return LlmResponse(content=types.Content(role="model", parts=list(parts)))


def code_block(code: str) -> LlmResponse:
    """A model's reply that is a fenced Python block, as a model writes code for an executor."""
    return model_says(types.Part(text=f"```python\n{code}\n```"))


class ScriptedModel(BaseLlm):
    """A stand-in for a model that answers each request with its next scripted reply and keeps
    the requests it was sent, so ADK's runner can be driven without any model service."""

    model: str = "scripted"
    replies: list[LlmResponse] = []
    requests: list[LlmRequest] = []

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        self.requests.append(llm_request)
        if not self.replies:
            raise AssertionError("the agent asked the model more often than the test scripted")
        yield self.replies.pop(0)


def user_says(text: str) -> types.Content:
    """A user's message."""
    return types.Content(role="user", parts=[types.Part(text=text)])
