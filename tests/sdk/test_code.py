"""Code execution through the SDK: stateful code contexts with rich results (the sandbox's code
interpreter, reached through the server's sandbox proxy), and one-shot runs (`POST /v1/run`),
sync and async."""

from __future__ import annotations

import time

import pytest

import moat


def test_python_state_results_and_logs(sandbox: moat.Sandbox) -> None:
    first = sandbox.run_code("x = 20\nprint('set')")
    assert first.results == [] and first.error is None
    assert first.logs.stdout == ["set\n"] and first.stdout == "set\n"
    assert first.execution_count == 1

    second = sandbox.run_code("import sys\nprint('out'); print('err', file=sys.stderr)\nx + 22")
    assert second.text == "42" and second.stdout == "out\n" and second.stderr == "err\n"
    (main,) = second.results
    assert main.is_main_result and main.formats() == ["text"]

    rich = sandbox.run_code(
        "class Page:\n"
        "    def _repr_html_(self): return '<b>bold</b>'\n"
        "    def _repr_markdown_(self): return '**bold**'\n"
        "    def __repr__(self): return 'Page'\n"
        "Page()"
    )
    (page,) = rich.results
    assert (page.html, page.markdown, page.text) == ("<b>bold</b>", "**bold**", "Page")
    assert set(page.formats()) == {"text", "html", "markdown"}
    image = sandbox.run_code(
        "class Figure:\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\npixels'\n"
        "    def _repr_json_(self): return {'points': [1, 2]}\n"
        "Figure()"
    ).results[0]
    assert image.png_bytes() == b"\x89PNG\r\n\x1a\npixels" and image.json == {"points": [1, 2]}
    assert {"png", "json", "text"} <= set(image.formats())
    assert sandbox.run_code("{'a': [1, 2]}").text == "{'a': [1, 2]}"
    assert sandbox.run_code("'abc'").text == "abc"


def test_errors_env_and_callbacks(sandbox: moat.Sandbox) -> None:
    failed = sandbox.run_code("print('before')\nraise ValueError('bad value')")
    assert failed.error is not None
    assert (failed.error.name, failed.error.value) == ("ValueError", "bad value")
    assert "Traceback" in failed.error.traceback and failed.stdout == "before\n"

    assert (
        sandbox.run_code("import os; os.environ.get('ONLY_NOW')", env={"ONLY_NOW": "yes"}).text
        == "yes"
    )
    # None is no result, as in a notebook.
    assert sandbox.run_code("import os; os.environ.get('ONLY_NOW')").results == []

    out: list[str] = []
    err: list[str] = []
    results: list[moat.Result] = []
    errors: list[moat.ExecutionError] = []
    sandbox.run_code(
        "import sys\nprint('o')\nprint('e', file=sys.stderr)\ndisplay(7)\n1/0",
        on_stdout=out.append,
        on_stderr=err.append,
        on_result=results.append,
        on_error=errors.append,
    )
    assert out == ["o\n"] and err == ["e\n"]
    assert [r.text for r in results] == ["7"] and not results[0].is_main_result
    assert [e.name for e in errors] == ["ZeroDivisionError"]


def test_contexts(sandbox: moat.Sandbox) -> None:
    ctx = sandbox.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    sandbox.run_code("y = 'mine'", context=ctx)
    assert sandbox.run_code("y", context=ctx.id).text == "mine"
    # The default context does not share it.
    assert sandbox.run_code("'y' in globals()").text == "False"
    assert sandbox.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"

    shell = sandbox.create_code_context(language="bash")
    sandbox.run_code("cd /etc; GREETING=hi", context=shell)
    assert sandbox.run_code("echo $GREETING; pwd", context=shell).stdout == "hi\n/etc\n"
    assert sandbox.run_code("echo in bash", language="bash").stdout == "in bash\n"

    listed = {c.id: c for c in sandbox.list_code_contexts()}
    assert ctx.id in listed and shell.id in listed and listed[shell.id].language == "bash"

    sandbox.restart_code_context(ctx)
    gone = sandbox.run_code("y", context=ctx)
    assert gone.error is not None and gone.error.name == "NameError"
    sandbox.remove_code_context(ctx)
    assert ctx.id not in {c.id for c in sandbox.list_code_contexts()}
    with pytest.raises(moat.NotFoundError):
        sandbox.run_code("1", context=ctx)
    with pytest.raises(moat.NotFoundError):
        sandbox.remove_code_context(ctx)

    with pytest.raises(ValueError, match="not both"):
        sandbox.run_code("1", language="python", context=shell)
    with pytest.raises(moat.InvalidRequestError):
        sandbox.run_code("1", language="cobol")
    with pytest.raises(moat.InvalidRequestError):
        sandbox.create_code_context(cwd="/no/such/dir")


def test_run_code_timeout_interrupts(sandbox: moat.Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(moat.SandboxTimeoutError):
        sandbox.run_code("import time\nwhile True: time.sleep(0.1)", timeout=1)
    assert time.monotonic() - started < 15
    # The context is usable again once the interrupted code has stopped.
    assert sandbox.run_code("6 * 7").text == "42"


def test_a_connected_sandbox_runs_code(client: moat.Client, sandbox: moat.Sandbox) -> None:
    again = moat.Sandbox.connect(sandbox.id, client=client)
    assert again.run_code("1 + 1").text == "2"
    listed = moat.Sandbox(
        moat.Sandbox.list(client=client, metadata=sandbox.last_info.metadata)[0], client
    )
    with pytest.raises(moat.MoatError, match="access token"):
        listed.run_code("1")


def test_one_shot_runs(client: moat.Client, server: tuple[str, str]) -> None:
    r = client.run(
        "print(open('in.txt').read().upper())\nopen('out.txt', 'w').write('done')",
        files={"in.txt": "hello", "data/raw.bin": b"\x00\x01"},
        output_files=["out.txt", "data/raw.bin", "missing.txt"],
    )
    assert (r.stdout, r.exit_code) == ("HELLO\n", 0) and r.sandbox_id
    assert r.file("out.txt").content == b"done" and r.file("out.txt").text == "done"
    assert r.file("data/raw.bin").content == b"\x00\x01"
    missing = r.file("missing.txt")
    assert missing.content is None and missing.error
    with pytest.raises(moat.MoatError):
        _ = missing.text
    with pytest.raises(KeyError):
        r.file("other")
    # The sandbox is gone by the time the answer comes.
    assert moat.Sandbox.connect(r.sandbox_id, client=client).last_info.state == "killed"

    assert client.run(cmd=["sh", "-c", "echo $0 $V", "argv0"], env={"V": "v"}).stdout == "argv0 v\n"
    assert client.run(shell="cat; exit 9", stdin="piped").stdout == "piped"
    assert client.run(shell="exit 9").exit_code == 9
    assert client.run("echo $SHELL_VAR", language="bash", env={"SHELL_VAR": "b"}).stdout == "b\n"
    assert client.run(shell="pwd", cwd="/tmp").stdout == "/tmp\n"
    assert client.run(shell="sleep 30", timeout=1).timed_out
    files = [moat.InputFile("a.txt", "A"), moat.InputFile("b.bin", b"B")]
    assert client.run(shell="cat a.txt b.bin", files=files).stdout == "AB"
    assert moat.run("print(6 * 7)").stdout == "42\n"

    with pytest.raises(ValueError, match="exactly one"):
        client.run()
    with pytest.raises(ValueError, match="exactly one"):
        client.run("print(1)", shell="true")
    with pytest.raises(ValueError, match="language"):
        client.run(shell="true", language="python")
    with pytest.raises(TypeError, match="stdin"):
        client.run(shell="cat", stdin=b"bytes")  # type: ignore[arg-type]
    with pytest.raises(moat.InvalidRequestError):
        client.run("1", language="cobol")


@pytest.mark.asyncio
async def test_async_code_and_runs(asandbox: moat.AsyncSandbox, aclient: moat.AsyncClient) -> None:
    await asandbox.run_code("n = 5")
    seen: list[str] = []

    async def on_stdout(text: str) -> None:
        seen.append(text)

    ex = await asandbox.run_code(
        "print('p'); n * 3", on_stdout=on_stdout, on_result=lambda r: seen.append("result")
    )
    assert ex.text == "15" and seen == ["p\n", "result"]
    ctx = await asandbox.create_code_context(language="bash")
    assert ctx.id in {c.id for c in await asandbox.list_code_contexts()}
    await asandbox.run_code("X=1", context=ctx)
    assert (await asandbox.run_code("echo $X", context=ctx)).stdout == "1\n"
    await asandbox.restart_code_context(ctx)
    assert (await asandbox.run_code("echo ${X:-unset}", context=ctx)).stdout == "unset\n"
    await asandbox.remove_code_context(ctx)
    with pytest.raises(moat.SandboxTimeoutError):
        await asandbox.run_code("import time\ntime.sleep(30)", timeout=1)

    r = await aclient.run("print(open('f').read())", files={"f": "x"}, output_files=["f"])
    assert r.stdout == "x\n" and r.file("f").content == b"x"
    assert (await moat.async_run(shell="echo one")).stdout == "one\n"


def test_code_runs_after_a_timeout_change_and_a_pause(sandbox: moat.Sandbox) -> None:
    # The answers of these calls carry no access token: the sandbox keeps the one it had.
    sandbox.set_timeout(120)
    assert sandbox.run_code("1 + 1").text == "2"
    sandbox.pause()
    sandbox.resume(timeout=120)
    assert sandbox.run_code("2 + 2").text == "4"


@pytest.mark.asyncio
async def test_async_code_runs_after_a_timeout_change(asandbox: moat.AsyncSandbox) -> None:
    await asandbox.set_timeout(120)
    assert (await asandbox.run_code("3 + 3")).text == "6"
