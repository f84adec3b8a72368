"""`MoatCodeExecutor(stateful=True)`: one sandbox and one interpreter per ADK session (the
input's `execution_id`, which ADK's flow sets to the session's id), with an idle timeout and
cleanup."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from google.adk.agents.invocation_context import InvocationContext
from google.adk.code_executors.code_execution_utils import CodeExecutionInput, CodeExecutionResult, File

import moat
from adk_helpers import live_sandboxes, state_of
from moat.integrations.adk import MoatCodeExecutor

Make = Callable[..., MoatCodeExecutor]


def run(
    executor: MoatCodeExecutor,
    context: InvocationContext,
    session: str,
    code: str,
    files: list[File] | None = None,
) -> CodeExecutionResult:
    """Runs `code` as ADK's flow does for a stateful executor."""
    return executor.execute_code(
        context, CodeExecutionInput(code=code, input_files=files or [], execution_id=session)
    )


def wait_for_state(client: moat.Client, sandbox_id: str, state: str, within: float = 15) -> None:
    """Waits until sandbox `sandbox_id` is in `state`."""
    deadline = time.monotonic() + within
    while state_of(client, sandbox_id) != state:
        assert time.monotonic() < deadline, f"sandbox {sandbox_id} never became {state}"
        time.sleep(0.2)


def test_a_session_keeps_its_variables_imports_and_files(
    make_executor: Make, mock_context: InvocationContext
) -> None:
    executor = make_executor(stateful=True)
    first = run(executor, mock_context, "s1", 'import math\nx = 41\nopen("kept.txt", "w").write("kept")\nprint("ready")')
    assert (first.stdout, first.stderr) == ("ready\n", "")
    assert [f.name for f in first.output_files] == ["kept.txt"]
    second = run(executor, mock_context, "s1", 'print(x + 1, math.floor(2.5), open("kept.txt").read())')
    assert (second.stdout, second.stderr) == ("42 2 kept\n", "")
    # Only what this run wrote or changed is an output: not the files of earlier runs.
    assert second.output_files == []
    third = run(executor, mock_context, "s1", 'open("kept.txt", "w").write("changed!")\nopen("new.txt", "w").write("n")')
    assert sorted((f.name, f.content) for f in third.output_files) == [("kept.txt", b"changed!"), ("new.txt", b"n")]


def test_input_files_reach_the_session(make_executor: Make, mock_context: InvocationContext) -> None:
    executor = make_executor(stateful=True)
    run(executor, mock_context, "s1", "rows = []")
    result = run(
        executor,
        mock_context,
        "s1",
        'rows.append(open("in.csv").read())\nprint(rows)',
        [File(name="in.csv", content=b"a,b\n", mime_type="text/csv")],
    )
    assert result.stdout == "['a,b\\n']\n"
    assert result.output_files == []


def test_an_error_keeps_the_session(make_executor: Make, mock_context: InvocationContext) -> None:
    executor = make_executor(stateful=True)
    run(executor, mock_context, "s1", "total = 10")
    failed = run(executor, mock_context, "s1", "total += 5\nraise KeyError('k')")
    assert "KeyError: 'k'" in failed.stderr
    after = run(executor, mock_context, "s1", "print(total)")
    assert (after.stdout, after.stderr) == ("15\n", "")


def test_a_timeout_interrupts_the_run_not_the_session(make_executor: Make, mock_context: InvocationContext) -> None:
    executor = make_executor(stateful=True, timeout_seconds=2)
    run(executor, mock_context, "s1", "kept = 'still here'")
    slow = run(executor, mock_context, "s1", "import time\ntime.sleep(60)")
    assert "timed out after 2 seconds" in slow.stderr
    after = run(executor, mock_context, "s1", "print(kept)")
    assert (after.stdout, after.stderr) == ("still here\n", "")


def test_two_sessions_are_isolated(make_executor: Make, mock_context: InvocationContext, client: moat.Client) -> None:
    executor = make_executor(stateful=True)
    run(executor, mock_context, "alice", 'secret = "alice\'s"\nopen("mine.txt", "w").write("a")')
    bob = run(executor, mock_context, "bob", "import os\nprint(os.path.exists('mine.txt'))\nprint(secret)")
    assert bob.stdout == "False\n"
    assert "NameError" in bob.stderr
    assert run(executor, mock_context, "alice", "print(secret)").stdout == "alice's\n"
    a, b = executor.session_sandbox_id("alice"), executor.session_sandbox_id("bob")
    assert a is not None and b is not None and a != b
    labels = {moat.Sandbox.connect(i, client=client).info().metadata["adk-session"] for i in (a, b)}
    assert labels == {"alice", "bob"}


def test_no_network_unless_asked(make_executor: Make, mock_context: InvocationContext, client: moat.Client) -> None:
    closed = make_executor(stateful=True)
    run(closed, mock_context, "s", "pass")
    sandbox_id = closed.session_sandbox_id("s")
    assert sandbox_id is not None
    network = moat.Sandbox.connect(sandbox_id, client=client).get_network()
    assert network.network == moat.Network()
    assert network.stats is None  # no network at all, not merely no rule used

    allowed = make_executor(stateful=True, network={"allow": ["example.com:443"]})
    run(allowed, mock_context, "s", "pass")
    sandbox_id = allowed.session_sandbox_id("s")
    assert sandbox_id is not None
    network = moat.Sandbox.connect(sandbox_id, client=client).get_network()
    assert network.network.allow == ("example.com:443",)


def test_an_idle_session_is_killed_and_starts_afresh(
    make_executor: Make, mock_context: InvocationContext, client: moat.Client
) -> None:
    executor = make_executor(stateful=True, idle_timeout=2)
    run(executor, mock_context, "s1", "x = 1")
    first = executor.session_sandbox_id("s1")
    assert first is not None
    # The server ends the sandbox once it has been idle that long, without the client.
    wait_for_state(client, first, "killed")
    assert moat.Sandbox.connect(first, client=client).info().end_reason == "ttl"
    again = run(executor, mock_context, "s1", "print(x)")
    assert "NameError" in again.stderr
    second = executor.session_sandbox_id("s1")
    assert second is not None and second != first


def test_a_session_whose_sandbox_ended_starts_afresh(
    make_executor: Make, mock_context: InvocationContext, client: moat.Client
) -> None:
    executor = make_executor(stateful=True)
    run(executor, mock_context, "s1", "x = 1")
    first = executor.session_sandbox_id("s1")
    assert first is not None
    moat.Sandbox.connect(first, client=client).kill()
    result = run(executor, mock_context, "s1", "print('new')")
    assert (result.stdout, result.stderr) == ("new\n", "")
    assert executor.session_sandbox_id("s1") not in (None, first)


def test_cleanup_kills_the_sandboxes(
    make_executor: Make, mock_context: InvocationContext, client: moat.Client, tag: str
) -> None:
    executor = make_executor(stateful=True)
    for session in ("a", "b", "c"):
        run(executor, mock_context, session, f"name = {session!r}")
    ids = {s: executor.session_sandbox_id(s) for s in ("a", "b", "c")}
    assert len(live_sandboxes(client, tag)) == 3

    executor.close_session("a")
    assert executor.session_sandbox_id("a") is None
    assert state_of(client, ids["a"] or "") == "killed"
    executor.close_session("a")  # nothing left to close
    # The session can start again, afresh.
    assert "NameError" in run(executor, mock_context, "a", "print(name)").stderr

    executor.close()
    assert live_sandboxes(client, tag) == []
    for sandbox_id in ids.values():
        assert state_of(client, sandbox_id or "") == "killed"
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        run(executor, mock_context, "b", "print(name)")


def test_the_executor_is_a_context_manager(make_executor: Make, mock_context: InvocationContext, client: moat.Client, tag: str) -> None:
    with make_executor(stateful=True) as executor:
        run(executor, mock_context, "s", "pass")
        assert len(live_sandboxes(client, tag)) == 1
    assert live_sandboxes(client, tag) == []
