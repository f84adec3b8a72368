"""`MoatCodeExecutor` inside ADK's own code-execution flow: the response processor that takes a
model's code block to the executor and its result back (events, artifacts, the error count
`error_retry_attempts` bounds), and a whole agent run through ADK's runner with a model that
replays scripted replies."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from google.adk.agents import LlmAgent
from google.adk.events.event import Event
from google.adk.flows.llm_flows._code_execution import response_processor
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import InMemoryRunner
from google.genai import types

import moat
from adk_helpers import ScriptedModel, code_block, invocation_context, live_sandboxes, model_says, user_says
from moat.integrations.adk import MoatCodeExecutor

Make = Callable[..., MoatCodeExecutor]

pytestmark = pytest.mark.asyncio


async def process(context: object, response: LlmResponse) -> list[Event]:
    """What ADK's code-execution response processor makes of the model's `response`."""
    return [event async for event in response_processor.run_async(context, response)]  # type: ignore[arg-type]


def outcome(event: Event) -> types.CodeExecutionResult:
    """The code execution result an event carries."""
    assert event.content is not None and event.content.parts
    result = event.content.parts[0].code_execution_result
    assert result is not None
    return result


async def test_a_code_block_runs_and_its_files_become_artifacts(make_executor: Make) -> None:
    agent = LlmAgent(name="coder", model="gemini-2.5-flash", code_executor=make_executor())
    context = await invocation_context(agent)
    code = 'print(6 * 7)\nopen("answer.txt", "w").write("42")'
    events = await process(context, model_says(types.Part(text="Let me compute."), types.Part(text=f"```python\n{code}\n```")))

    assert len(events) == 2
    # The model's turn, cut after its code block, and then the result.
    assert events[0].content is not None and events[0].content.parts
    assert events[0].content.parts[-1].executable_code is not None
    assert events[0].content.parts[-1].executable_code.code == code
    result = outcome(events[1])
    assert result.outcome == types.Outcome.OUTCOME_OK
    assert result.output == "Code execution result:\n42\n\n\n\nSaved artifacts:\n`answer.txt`"
    assert events[1].actions.artifact_delta == {"answer.txt": 0}
    assert context.artifact_service is not None
    artifact = await context.artifact_service.load_artifact(
        app_name=context.app_name, user_id=context.user_id, session_id=context.session.id, filename="answer.txt"
    )
    assert artifact is not None and artifact.inline_data is not None
    assert (artifact.inline_data.data, artifact.inline_data.mime_type) == (b"42", "text/plain")


async def test_executable_code_parts_run_too(make_executor: Make) -> None:
    agent = LlmAgent(name="coder", model="gemini-2.5-flash", code_executor=make_executor())
    context = await invocation_context(agent)
    part = types.Part.from_executable_code(code="print('from a part')", language=types.Language.PYTHON)
    events = await process(context, model_says(part))
    assert outcome(events[-1]).output == "Code execution result:\nfrom a part\n\n"


async def test_a_failure_is_reported_and_counted_against_error_retry_attempts(
    make_executor: Make, client: moat.Client, tag: str
) -> None:
    agent = LlmAgent(name="coder", model="gemini-2.5-flash", code_executor=make_executor(error_retry_attempts=2))
    context = await invocation_context(agent)

    for attempt in range(2):
        events = await process(context, code_block(f"print('attempt {attempt}')\nundefined_name"))
        result = outcome(events[-1])
        assert result.outcome == types.Outcome.OUTCOME_FAILED
        assert "NameError: name 'undefined_name' is not defined" in (result.output or "")
    sandboxes_used = len(moat.Sandbox.list(metadata={"test": tag}, client=client))
    assert sandboxes_used == 2

    # Two consecutive failures in this invocation: ADK runs no more code for it.
    response = code_block("print('third')")
    assert await process(context, response) == []
    assert len(moat.Sandbox.list(metadata={"test": tag}, client=client)) == sandboxes_used

    # A success resets the count, in a new invocation.
    context.invocation_id = "next-invocation"
    events = await process(context, code_block("print('fine')"))
    assert outcome(events[-1]).outcome == types.Outcome.OUTCOME_OK
    assert live_sandboxes(client, tag) == []


async def test_data_files_the_flow_keeps_reach_the_code(make_executor: Make) -> None:
    # The flow hands the executor the session's input files (base64 text) with every code block.
    agent = LlmAgent(name="coder", model="gemini-2.5-flash", code_executor=make_executor())
    context = await invocation_context(agent)
    context.session.state["_code_executor_input_files"] = [
        {"name": "data_1_1.csv", "content": base64.b64encode(b"x,y\n1,2\n").decode(), "mime_type": "text/csv"}
    ]
    events = await process(context, code_block("print(open('data_1_1.csv').read().splitlines())"))
    assert outcome(events[-1]).output == "Code execution result:\n['x,y', '1,2']\n\n"


async def test_a_stateful_agent_run_through_the_runner(make_executor: Make, client: moat.Client, tag: str) -> None:
    executor = make_executor(stateful=True)
    model = ScriptedModel(
        replies=[
            code_block("import statistics\nsamples = [3, 5, 7]\nprint(statistics.mean(samples))"),
            code_block("samples.append(9)\nprint(len(samples))"),
            model_says(types.Part(text="The mean is 5 and there are now 4 samples.")),
        ]
    )
    agent = LlmAgent(name="analyst", model=model, code_executor=executor)
    runner = InMemoryRunner(agent=agent, app_name="adk_suite")
    session = await runner.session_service.create_session(app_name="adk_suite", user_id="tester")

    events = [
        event
        async for event in runner.run_async(user_id="tester", session_id=session.id, new_message=user_says("go"))
    ]
    results = [
        part.code_execution_result.output
        for event in events
        for part in (event.content.parts or [] if event.content else [])
        if part.code_execution_result is not None
    ]
    assert results == ["Code execution result:\n5\n\n", "Code execution result:\n4\n\n"]
    assert events[-1].is_final_response()
    # The model saw the first result before writing its second block.
    second_request = "\n".join(
        part.text or "" for content in model.requests[1].contents for part in content.parts or []
    )
    assert "```tool_output\nCode execution result:\n5\n" in second_request
    # The flow used the session's id as the execution id: one sandbox for the whole run.
    sandbox_id = executor.session_sandbox_id(session.id)
    assert sandbox_id is not None
    assert [s.id for s in live_sandboxes(client, tag)] == [sandbox_id]
    await runner.close()
    executor.close()
    assert live_sandboxes(client, tag) == []
