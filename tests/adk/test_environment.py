"""`MoatEnvironment`: ADK's `BaseEnvironment` in a moat sandbox, on its own and through ADK's
`EnvironmentToolset`, whose tools are called as a model's function calls arrive (directly, and
through ADK's runner with a model that replays scripted replies)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from google.adk.agents import LlmAgent
from google.adk.environment import BaseEnvironment, ExecutionResult
from google.adk.models.llm_request import LlmRequest
from google.adk.runners import InMemoryRunner
from google.adk.tools.base_tool import BaseTool
from google.adk.tools.environment import EnvironmentToolset
from google.genai import types

import moat
from adk_helpers import ScriptedModel, live_sandboxes, model_says, state_of, user_says
from moat.integrations.adk import MoatEnvironment

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def env(server: tuple[str, str], tag: str) -> AsyncIterator[MoatEnvironment]:
    """An initialized environment, closed after the test."""
    environment = MoatEnvironment(metadata={"test": tag})
    await environment.initialize()
    try:
        yield environment
    finally:
        await environment.close()


async def tools_of(toolset: EnvironmentToolset) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in await toolset.get_tools()}


async def test_lifecycle(server: tuple[str, str], client: moat.Client, tag: str) -> None:
    environment = MoatEnvironment(metadata={"test": tag})
    assert isinstance(environment, BaseEnvironment)
    with pytest.raises(RuntimeError, match="initialize"):
        environment.working_dir
    with pytest.raises(RuntimeError, match="initialize"):
        await environment.execute("true")
    await environment.close()  # nothing to close yet

    await environment.initialize()
    sandbox = environment.sandbox
    assert sandbox is not None
    await environment.initialize()  # idempotent: the same sandbox
    assert environment.sandbox is sandbox
    assert [s.id for s in live_sandboxes(client, tag)] == [sandbox.id]
    assert environment.working_dir == Path("/home/user/workspace")
    assert environment.working_dir.is_absolute()

    await environment.close()
    assert environment.sandbox is None
    assert state_of(client, sandbox.id) == "killed"
    await environment.close()  # idempotent
    with pytest.raises(RuntimeError, match="initialize"):
        await environment.read_file("x")

    # Initializing again makes a new sandbox.
    await environment.initialize()
    assert environment.sandbox is not None and environment.sandbox.id != sandbox.id
    await environment.close()
    assert live_sandboxes(client, tag) == []


async def test_execute_runs_a_shell_command_in_the_working_dir(env: MoatEnvironment) -> None:
    result = await env.execute('pwd; echo "out"; echo "err" >&2; exit 3')
    assert result == ExecutionResult(exit_code=3, stdout="/home/user/workspace\nout\n", stderr="err\n", timed_out=False)
    piped = await env.execute("printf 'b\\na\\n' | sort && echo $((6 * 7))")
    assert (piped.exit_code, piped.stdout) == (0, "a\nb\n42\n")


async def test_execute_timeout_and_signals(env: MoatEnvironment) -> None:
    started = time.monotonic()
    slow = await env.execute("echo started; sleep 60", timeout=1)
    assert time.monotonic() - started < 20
    assert slow.timed_out
    assert slow.stdout == "started\n"
    assert slow.exit_code == -9  # killed, as Python's subprocess reports it
    killed = await env.execute("kill -TERM $$")
    assert (killed.exit_code, killed.timed_out) == (-15, False)
    # A fractional timeout is rounded up, not refused.
    assert (await env.execute("true", timeout=0.5)).exit_code == 0


async def test_files(env: MoatEnvironment) -> None:
    await env.write_file("notes/deep/a.txt", "text\n")
    await env.write_file(Path("bin.dat"), bytes(range(256)))
    assert await env.read_file("notes/deep/a.txt") == b"text\n"
    assert await env.read_file(env.working_dir / "bin.dat") == bytes(range(256))
    # Files are the commands' files.
    listed = await env.execute("cat notes/deep/a.txt && wc -c < bin.dat")
    assert listed.stdout.split() == ["text", "256"]
    await env.execute("echo from-shell > made.txt")
    assert await env.read_file("made.txt") == b"from-shell\n"
    # Absolute paths reach the rest of the sandbox.
    assert b"user" in await env.read_file("/etc/passwd")
    await env.write_file("/tmp/elsewhere.txt", "x")
    assert (await env.execute("cat /tmp/elsewhere.txt")).stdout == "x"

    with pytest.raises(FileNotFoundError):
        await env.read_file("missing.txt")
    with pytest.raises(IsADirectoryError):
        await env.read_file("notes")
    with pytest.raises(IsADirectoryError):
        await env.write_file("notes", "x")
    with pytest.raises(PermissionError):
        await env.read_file("/root/.profile")
    with pytest.raises(TypeError):
        await env.write_file("x.txt", 42)  # type: ignore[arg-type]


async def test_no_network_unless_asked(server: tuple[str, str], tag: str) -> None:
    closed = MoatEnvironment(metadata={"test": tag})
    allowed = MoatEnvironment(metadata={"test": tag}, network={"allow": ["example.com:443"]})
    try:
        await closed.initialize()
        await allowed.initialize()
        assert closed.sandbox is not None and allowed.sandbox is not None
        network = await closed.sandbox.get_network()
        assert (network.network, network.stats) == (moat.Network(), None)
        assert (await allowed.sandbox.get_network()).network.allow == ("example.com:443",)
    finally:
        await closed.close()
        await allowed.close()


async def test_settings(server: tuple[str, str], client: moat.Client, tag: str) -> None:
    environment = MoatEnvironment(metadata={"test": tag}, working_dir="/tmp/job", env={"GREETING": "hi"}, idle_timeout=120)
    try:
        await environment.initialize()
        assert environment.working_dir == Path("/tmp/job")
        result = await environment.execute("pwd; echo $GREETING")
        assert result.stdout == "/tmp/job\nhi\n"
        assert environment.sandbox is not None
        info = moat.Sandbox.connect(environment.sandbox.id, client=client).info()
        assert info.expires_at is not None and info.metadata["integration"] == "google-adk"
        left = (info.expires_at - info.created_at).total_seconds()
        assert 60 < left <= 180
    finally:
        await environment.close()
    for bad in ({"working_dir": ""}, {"idle_timeout": 0}, {"network": "open"}, {"template": ""}):
        with pytest.raises((ValueError, TypeError)):
            MoatEnvironment(**bad)  # type: ignore[arg-type]


async def test_an_idle_environment_is_killed(server: tuple[str, str], client: moat.Client, tag: str) -> None:
    environment = MoatEnvironment(metadata={"test": tag}, idle_timeout=2)
    try:
        await environment.initialize()
        assert (await environment.execute("echo used")).stdout == "used\n"
        assert environment.sandbox is not None
        sandbox_id = environment.sandbox.id
        deadline = time.monotonic() + 15
        while state_of(client, sandbox_id) != "killed":
            assert time.monotonic() < deadline, "the idle sandbox was never killed"
            time.sleep(0.2)
        # A use after that gets a fresh sandbox: ADK initializes an environment only once.
        assert (await environment.execute("echo again")).stdout == "again\n"
        assert environment.sandbox is not None and environment.sandbox.id != sandbox_id
        await environment.write_file("note.txt", "kept")
        assert await environment.read_file("note.txt") == b"kept"
    finally:
        await environment.close()


async def test_toolset_tools_as_function_calls_arrive(server: tuple[str, str], client: moat.Client, tag: str) -> None:
    environment = MoatEnvironment(metadata={"test": tag})
    toolset = EnvironmentToolset(environment=environment)
    tools = await tools_of(toolset)  # initializes the environment
    assert set(tools) == {"Execute", "ReadFile", "EditFile", "WriteFile"}
    assert environment.sandbox is not None
    sandbox_id = environment.sandbox.id

    async def call(name: str, **args: object) -> dict[str, object]:
        result = await tools[name].run_async(args=args, tool_context=None)  # type: ignore[arg-type]
        assert isinstance(result, dict)
        return result

    assert await call("WriteFile", path="src/app.py", content="print('hello')\n") == {
        "status": "ok",
        "message": "Wrote src/app.py",
    }
    assert await call("Execute", command="python3 src/app.py") == {"status": "ok", "stdout": "hello\n"}
    assert await call("EditFile", path="src/app.py", old_string="hello", new_string="edited") == {
        "status": "ok",
        "message": "Edited src/app.py",
    }
    assert await call("ReadFile", path="src/app.py") == {"status": "ok", "content": "     1\tprint('edited')\n"}
    assert await call("ReadFile", path="nope.txt") == {"status": "error", "error": "File not found: nope.txt"}
    assert await call("EditFile", path="nope.txt", old_string="a", new_string="b") == {
        "status": "error",
        "error": "File not found: nope.txt",
    }
    failed = await call("Execute", command="echo oops >&2; exit 2")
    assert failed == {"status": "error", "stderr": "oops\n", "exit_code": 2}

    # The toolset tells the model where the environment is.
    request = LlmRequest()
    await toolset.process_llm_request(tool_context=None, llm_request=request)  # type: ignore[arg-type]
    assert "Your environment is at /home/user/workspace/" in str(request.config.system_instruction)

    await toolset.close()
    assert environment.sandbox is None
    assert state_of(client, sandbox_id) == "killed"


async def test_an_agent_run_through_the_runner(server: tuple[str, str], client: moat.Client, tag: str) -> None:
    environment = MoatEnvironment(metadata={"test": tag})
    model = ScriptedModel(
        replies=[
            model_says(
                types.Part(
                    function_call=types.FunctionCall(
                        name="WriteFile", args={"path": "count.sh", "content": "seq 3 | wc -l\n"}
                    )
                )
            ),
            model_says(types.Part(function_call=types.FunctionCall(name="Execute", args={"command": "sh count.sh"}))),
            model_says(types.Part(text="The script counts 3 lines.")),
        ]
    )
    agent = LlmAgent(name="operator", model=model, tools=[EnvironmentToolset(environment=environment)])
    runner = InMemoryRunner(agent=agent, app_name="adk_suite")
    session = await runner.session_service.create_session(app_name="adk_suite", user_id="tester")

    events = [
        event
        async for event in runner.run_async(user_id="tester", session_id=session.id, new_message=user_says("go"))
    ]
    responses = [
        (part.function_response.name, part.function_response.response)
        for event in events
        for part in (event.content.parts or [] if event.content else [])
        if part.function_response is not None
    ]
    assert responses == [
        ("WriteFile", {"status": "ok", "message": "Wrote count.sh"}),
        ("Execute", {"status": "ok", "stdout": "3\n"}),
    ]
    assert events[-1].is_final_response()
    assert "/home/user/workspace" in str(model.requests[0].config.system_instruction)
    assert len(live_sandboxes(client, tag)) == 1
    # Closing the runner closes its toolsets, and so the environment.
    await runner.close()
    assert live_sandboxes(client, tag) == []
