"""The unmodified `e2b-code-interpreter` SDK against moat serve."""

import pytest
from e2b import TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox


@pytest.fixture(scope="module")
def sbx():
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


def test_state_persists_and_last_expression_is_the_result(sbx):
    sbx.run_code("x = 40")
    execution = sbx.run_code("x + 2")
    assert execution.text == "42"
    assert execution.error is None


def test_stdout_stderr_and_callbacks(sbx):
    out = []
    execution = sbx.run_code(
        "import sys\nprint('hello')\nprint('oops', file=sys.stderr)",
        on_stdout=lambda m: out.append(m.line),
    )
    assert execution.logs.stdout == ["hello\n"]
    assert execution.logs.stderr == ["oops\n"]
    assert out == ["hello\n"]


def test_errors_carry_name_value_and_traceback(sbx):
    execution = sbx.run_code("1 / 0")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert "division by zero" in execution.error.value
    assert "ZeroDivisionError" in execution.error.traceback
    # The context survives its errors.
    assert sbx.run_code("1 + 1").text == "2"


def test_rich_results(sbx):
    execution = sbx.run_code(
        "class Page:\n"
        "    def _repr_html_(self):\n"
        "        return '<b>bold</b>'\n"
        "    def __repr__(self):\n"
        "        return 'Page'\n"
        "Page()"
    )
    assert execution.results[0].html == "<b>bold</b>"
    assert execution.results[0].text == "Page"


def test_envs_apply_to_one_execution(sbx):
    code = "import os\nos.environ.get('ONLY_ONCE', 'unset')"
    assert sbx.run_code(code, envs={"ONLY_ONCE": "set"}).text == "set"
    assert sbx.run_code(code).text == "unset"


def test_contexts(sbx):
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.language == "python"
    assert ctx.cwd == "/tmp"
    sbx.run_code("y = 5", context=ctx)
    assert sbx.run_code("y", context=ctx).text == "5"
    assert sbx.run_code("'y' in globals()").text == "False"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.restart_code_context(ctx)
    assert sbx.run_code("'y' in globals()", context=ctx).text == "False"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]


def test_timeout_interrupts_the_execution_not_the_context(sbx):
    sbx.run_code("kept = 'yes'")
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\nwhile True: time.sleep(0.1)", timeout=2)
    assert sbx.run_code("kept").text == "yes"


def test_bash_context_keeps_shell_state(sbx):
    sbx.run_code("cd /tmp && export GREETING=hi", language="bash")
    execution = sbx.run_code("echo $GREETING from $(pwd)", language="bash")
    assert execution.logs.stdout == ["hi from /tmp\n"]


@pytest.mark.asyncio
async def test_async_run_code():
    sandbox = await AsyncSandbox.create()
    try:
        await sandbox.run_code("z = 6")
        execution = await sandbox.run_code("z * 7")
        assert execution.text == "42"
    finally:
        await sandbox.kill()
