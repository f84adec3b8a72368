"""`MoatCodeExecutor` without state: each call as ADK's flow makes it (`execute_code` with an
invocation context and a `CodeExecutionInput`) runs in a fresh sandbox."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest
from google.adk.agents.invocation_context import InvocationContext
from google.adk.code_executors.base_code_executor import BaseCodeExecutor
from google.adk.code_executors.code_execution_utils import CodeExecutionInput, CodeExecutionResult, File
from pydantic import ValidationError

import moat
from adk_helpers import live_sandboxes
from moat.integrations.adk import MoatCodeExecutor

Make = Callable[..., MoatCodeExecutor]


def run(executor: MoatCodeExecutor, context: InvocationContext, code: str, files: list[File] | None = None) -> CodeExecutionResult:
    """Runs `code` as ADK's flow does for a stateless executor (no execution id)."""
    return executor.execute_code(context, CodeExecutionInput(code=code, input_files=files or []))


def test_defaults_follow_adk(make_executor: Make) -> None:
    executor = make_executor()
    assert isinstance(executor, BaseCodeExecutor)
    assert not executor.stateful
    assert not executor.optimize_data_file
    assert executor.error_retry_attempts == 2
    assert executor.timeout_seconds == 300
    assert executor.network is False
    assert ("```python\n", "\n```") in executor.code_block_delimiters


def test_stdout_is_captured(make_executor: Make, mock_context: InvocationContext) -> None:
    result = run(make_executor(), mock_context, 'print("hello world")\nfor i in range(3):\n    print(i)')
    assert result.stdout == "hello world\n0\n1\n2\n"
    assert result.stderr == ""
    assert result.output_files == []


def test_an_exception_is_a_traceback_on_stderr(make_executor: Make, mock_context: InvocationContext) -> None:
    code = 'print("before")\ndef fail():\n    raise ValueError("Test error")\nfail()\nprint("after")'
    result = run(make_executor(), mock_context, code)
    assert result.stdout == "before\n"
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "in fail" in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: Test error")


def test_output_on_stderr_alone_is_no_failure(make_executor: Make, mock_context: InvocationContext) -> None:
    # ADK takes any stderr for a failure: what a successful run prints there follows stdout.
    code = 'import sys\nprint("one")\nprint("warning: careful", file=sys.stderr)\nprint("two")'
    result = run(make_executor(), mock_context, code)
    assert result.stderr == ""
    assert result.stdout == "one\ntwo\nwarning: careful\n"


def test_sys_exit(make_executor: Make, mock_context: InvocationContext) -> None:
    executor = make_executor()
    assert run(executor, mock_context, 'print("ok")\nimport sys\nsys.exit(0)').stderr == ""
    failed = run(executor, mock_context, "import sys\nsys.exit(3)")
    assert "SystemExit: 3" in failed.stderr


def test_code_runs_as_a_script(make_executor: Make, mock_context: InvocationContext) -> None:
    # A bare last expression shows nothing (the interpreter is a notebook's, ADK's executors
    # run scripts), and a main guard runs.
    code = 'x = 6\nif __name__ == "__main__":\n    print("main")\nx * 7'
    result = run(make_executor(), mock_context, code)
    assert result.stdout == "main\n"
    assert result.stderr == ""


def test_input_files_are_visible(make_executor: Make, mock_context: InvocationContext) -> None:
    files = [
        File(name="notes.txt", content=b"raw bytes\n"),
        # The flow hands inline data files over as base64 text.
        File(name="data_1_1.csv", content=base64.b64encode(b"a,b\n1,2\n").decode(), mime_type="text/csv"),
        File(name="nested/blob.bin", content=bytes(range(256)), mime_type="application/octet-stream"),
    ]
    code = (
        "import os\n"
        'print(open("notes.txt").read(), end="")\n'
        'print(open("data_1_1.csv").read(), end="")\n'
        'print(open("nested/blob.bin", "rb").read() == bytes(range(256)))\n'
        "print(sorted(os.listdir()))"
    )
    result = run(make_executor(), mock_context, code, files)
    assert result.stderr == ""
    assert result.stdout == "raw bytes\na,b\n1,2\nTrue\n['data_1_1.csv', 'nested', 'notes.txt']\n"
    # Inputs are not outputs.
    assert result.output_files == []


def test_output_files_are_returned(make_executor: Make, mock_context: InvocationContext) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    code = (
        "import json, os\n"
        'open("report.txt", "w").write("total: 3\\n")\n'
        f'open("plot.png", "wb").write({png!r})\n'
        'os.makedirs("out", exist_ok=True)\n'
        'json.dump({"ok": True}, open("out/result.json", "w"))\n'
        # Hidden files and caches are not outputs.
        'open(".scratch", "w").write("x")\n'
        'os.makedirs("__pycache__", exist_ok=True)\n'
        'open("__pycache__/m.pyc", "wb").write(b"x")\n'
        # Nor is an input, even rewritten.
        'open("given.txt", "a").write("more")\n'
        'print("written")'
    )
    result = run(make_executor(), mock_context, code, [File(name="given.txt", content=b"given")])
    assert result.stderr == ""
    assert result.stdout == "written\n"
    files = {f.name: f for f in result.output_files}
    assert set(files) == {"report.txt", "plot.png", "out/result.json"}
    assert files["report.txt"].content == b"total: 3\n"
    assert files["report.txt"].mime_type == "text/plain"
    assert files["plot.png"].content == png
    assert files["plot.png"].mime_type == "image/png"
    assert files["out/result.json"].content == b'{"ok": true}'
    assert files["out/result.json"].mime_type == "application/json"


def test_output_files_are_bounded(make_executor: Make, mock_context: InvocationContext) -> None:
    code = 'import os\nos.makedirs("many")\nfor i in range(150):\n    open(f"many/{i:03}.txt", "w").write(str(i))'
    result = run(make_executor(), mock_context, code)
    assert result.stderr == ""
    assert [f.name for f in result.output_files] == [f"many/{i:03}.txt" for i in range(100)]


def test_printed_output_is_bounded(make_executor: Make, mock_context: InvocationContext) -> None:
    result = run(make_executor(), mock_context, 'print("x" * 3_000_000)')
    assert result.stderr == ""
    assert result.stdout.startswith("x" * 1000)
    assert len(result.stdout) < 1_100_000, len(result.stdout)
    assert "more characters of output were dropped" in result.stdout


def test_files_written_before_a_failure_are_returned(make_executor: Make, mock_context: InvocationContext) -> None:
    result = run(make_executor(), mock_context, 'open("partial.txt", "w").write("half")\n1 / 0')
    assert "ZeroDivisionError" in result.stderr
    assert [(f.name, f.content) for f in result.output_files] == [("partial.txt", b"half")]


def test_each_call_has_a_fresh_sandbox_killed_after(
    make_executor: Make, mock_context: InvocationContext, client: moat.Client, tag: str
) -> None:
    executor = make_executor()
    first = run(executor, mock_context, 'x = 1\nopen("left.txt", "w").write("x")\nprint("set")')
    assert first.stdout == "set\n"
    second = run(executor, mock_context, "import os\nprint(os.path.exists('left.txt'))\nprint(x)")
    assert second.stdout == "False\n"
    assert "NameError" in second.stderr
    assert live_sandboxes(client, tag) == []
    # Both sandboxes were the test's, and both are gone.
    ended = moat.Sandbox.list(metadata={"test": tag}, client=client)
    assert len(ended) == 2
    assert {s.state for s in ended} == {"killed"}
    assert all(s.metadata.get("integration") == "google-adk" for s in ended)


def test_a_run_past_its_timeout_is_interrupted(
    make_executor: Make, mock_context: InvocationContext, client: moat.Client, tag: str
) -> None:
    executor = make_executor(timeout_seconds=2)
    started = time.monotonic()
    result = run(executor, mock_context, 'import time\nprint("started", flush=True)\ntime.sleep(60)\nprint("never")')
    assert time.monotonic() - started < 30
    assert result.stdout == "started\n"
    assert "timed out after 2 seconds" in result.stderr
    assert live_sandboxes(client, tag) == []


def test_the_template_picks_the_backend(
    make_executor: Make, mock_context: InvocationContext, client: moat.Client, tag: str
) -> None:
    name = f"adk-gvisor-{tag}"
    try:
        client.templates.create(name, moat.TemplateSpec(backend="gvisor"))
    except moat.UnavailableError as e:
        pytest.skip(f"this host cannot run gvisor sandboxes: {e}")
    try:
        executor = make_executor(template=name, stateful=True)
        result = executor.execute_code(
            mock_context, CodeExecutionInput(code='print("under gvisor")', execution_id="s")
        )
        assert result.stdout == "under gvisor\n"
        sandbox_id = executor.session_sandbox_id("s")
        assert sandbox_id is not None
        info = moat.Sandbox.connect(sandbox_id, client=client).info()
        assert (info.template, info.backend) == (name, "gvisor")
        executor.close()
    finally:
        client.templates.delete(name, force=True)


def test_bad_input_is_refused(
    make_executor: Make, mock_context: InvocationContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = make_executor()
    with pytest.raises(ValueError, match="inside the working directory"):
        run(executor, mock_context, "pass", [File(name="../escape.txt", content=b"x")])
    with pytest.raises(ValueError, match="relative path"):
        run(executor, mock_context, "pass", [File(name="/etc/x", content=b"x")])
    with pytest.raises(ValueError, match="base64"):
        run(executor, mock_context, "pass", [File(name="plain.txt", content="not base64!")])
    with pytest.raises(ValueError, match="execution_id"):
        make_executor(stateful=True).execute_code(mock_context, CodeExecutionInput(code="pass"))
    for settings in (
        {"templat": "host"},
        {"timeout_seconds": 0},
        {"idle_timeout": -1},
        {"error_retry_attempts": -1},
        {"working_dir": "../up"},
        {"template": " "},
        {"network": {"internet": True, "unknown": 1}},
    ):
        with pytest.raises((ValidationError, ValueError, TypeError)):
            MoatCodeExecutor(**settings)
    monkeypatch.delenv("MOAT_URL")
    with pytest.raises(ValidationError, match="MOAT_URL"):
        MoatCodeExecutor()
    with pytest.raises(ValidationError, match="frozen"):
        executor.url = "http://elsewhere:1"


def test_a_closed_executor_runs_nothing(make_executor: Make, mock_context: InvocationContext) -> None:
    executor = make_executor()
    executor.close()
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        run(executor, mock_context, "pass")
