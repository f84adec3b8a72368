"""Commands through the SDK: buffered results, event streams, callbacks, input, timeouts and
failures, sync and async."""

from __future__ import annotations

import time

import pytest

import moat


def test_buffered_results(sandbox: moat.Sandbox) -> None:
    r = sandbox.exec("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code, r.signal) == ("out\n", "err\n", 3, None)
    assert not r.ok and not r.timed_out and not r.oom_killed and not r.truncated
    assert r.duration_ms >= 0 and r.duration == r.duration_ms / 1000
    with pytest.raises(moat.CommandExitError) as err:
        r.check()
    assert err.value.result is r and "exited 3" in str(err.value) and "err" in str(err.value)

    ok = sandbox.exec(["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME"])
    assert ok.check() is ok and ok.stdout == "['a b', '$HOME']\n"

    missing = sandbox.exec(["no-such-program"])
    assert missing.exit_code == 127 and missing.stderr


def test_env_cwd_user_and_stdin(sandbox: moat.Sandbox) -> None:
    r = sandbox.exec("echo $A $B; pwd; id -un", env={"A": "1", "B": "two"}, cwd="/tmp")
    assert r.stdout == "1 two\n/tmp\nuser\n"
    assert sandbox.exec("id -un", user="root").stdout == "root\n"
    assert sandbox.exec("pwd").stdout == "/home/user\n"
    assert sandbox.exec("tr a-z A-Z", stdin="hello").stdout == "HELLO"
    # Bytes go in and come out exactly, whatever they are.
    raw = bytes(range(256))
    binary = sandbox.exec(["cat"], stdin=raw)
    assert binary.stdout_bytes == raw
    assert binary.stdout == raw.decode("utf-8", "replace")
    assert sandbox.exec("cat").stdout == ""  # no stdin: end of file at once


def test_timeout_kills_the_command(sandbox: moat.Sandbox) -> None:
    started = time.monotonic()
    r = sandbox.exec("echo started; sleep 30; echo never", timeout=1)
    assert time.monotonic() - started < 15
    assert r.timed_out and r.exit_code is None and r.stdout == "started\n"
    with pytest.raises(moat.SandboxTimeoutError) as err:
        r.check()
    assert isinstance(err.value, TimeoutError)
    # The whole process group went with it.
    assert "sleep 30" not in sandbox.exec("ps -eo args").stdout


def test_streamed_events(sandbox: moat.Sandbox) -> None:
    events = list(sandbox.exec_stream("echo one; sleep 0.3; echo two >&2; printf 'é'; exit 4"))
    assert isinstance(events[0], moat.ExecStart) and events[0].pid > 0
    end = events[-1]
    assert isinstance(end, moat.ExecEnd) and end.exit_code == 4 and not end.timed_out
    outputs = [e for e in events if isinstance(e, moat.ExecOutput)]
    assert "".join(e.text for e in outputs if e.stream == "stdout") == "one\né"
    assert b"".join(e.data for e in outputs if e.stream == "stderr") == b"two\n"


def test_stream_arrives_as_it_happens(sandbox: moat.Sandbox) -> None:
    stream = sandbox.exec_stream("echo first; sleep 2; echo second")
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    with stream:
        for ev in stream:
            if isinstance(ev, moat.ExecOutput):
                seen.append((time.monotonic() - started, ev.text))
    assert [t for _, t in seen] == ["first\n", "second\n"]
    assert seen[0][0] < 1.5 <= seen[1][0]
    assert stream.end is not None and stream.end.exit_code == 0


def test_stream_wait_and_timeout(sandbox: moat.Sandbox) -> None:
    result = sandbox.exec_stream("echo a; echo b >&2").wait()
    assert (result.stdout, result.stderr, result.exit_code) == ("a\n", "b\n", 0)
    timed = sandbox.exec_stream("sleep 30", timeout=1).wait()
    assert timed.timed_out and timed.exit_code is None


def test_a_loop_left_early_is_taken_up_by_wait(sandbox: moat.Sandbox) -> None:
    with sandbox.exec_stream("echo first; sleep 0.5; echo second; exit 3") as stream:
        for ev in stream:
            if isinstance(ev, moat.ExecOutput):
                break
        # The command runs on; the rest of its output is the result's.
        result = stream.wait()
    assert (result.stdout, result.exit_code) == ("second\n", 3)
    # Left at its end: the end is known, and wait() answers with nothing more to read.
    stream = sandbox.exec_stream("exit 5")
    for ev in stream:
        if isinstance(ev, moat.ExecEnd):
            break
    assert stream.wait().exit_code == 5


def test_closing_a_stream_kills_the_command(sandbox: moat.Sandbox) -> None:
    with sandbox.exec_stream("echo ready; exec sleep 300") as stream:
        for ev in stream:
            if isinstance(ev, moat.ExecOutput):
                break
    deadline = time.monotonic() + 10
    while "sleep 300" in sandbox.exec("ps -eo args").stdout:
        assert time.monotonic() < deadline, "the command outlived its stream"
        time.sleep(0.2)


def test_callbacks(sandbox: moat.Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    r = sandbox.exec(
        "for i in 1 2 3; do echo $i; echo e$i >&2; done; exit 2",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "1\n2\n3\n" and "".join(err) == "e1\ne2\ne3\n"
    assert r.exit_code == 2 and r.stdout == "1\n2\n3\n" and r.stderr == "e1\ne2\ne3\n"
    # One callback alone is enough to stream.
    assert sandbox.exec("echo x", on_stdout=out.append).stdout == "x\n"
    assert out[-1] == "x\n"


def test_refusals(client: moat.Client, sandbox: moat.Sandbox, tag: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        sandbox.exec("  ")
    with pytest.raises(ValueError, match="argv"):
        sandbox.exec([])
    with pytest.raises(TypeError, match="str"):
        sandbox.exec(["echo", 1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="3600"):
        sandbox.exec("true", timeout=3601)
    with pytest.raises(ValueError, match="user"):
        sandbox.exec("true", user="admin")
    with pytest.raises(TypeError, match="stdin"):
        sandbox.exec("cat", stdin=42)  # type: ignore[arg-type]
    with pytest.raises(moat.InvalidRequestError):
        sandbox.exec("true", cwd="relative/dir")
    gone = moat.Sandbox.create(client=client, metadata={"test": tag})
    gone.kill()
    with pytest.raises(moat.ConflictError):
        gone.exec("true")
    with pytest.raises(moat.ConflictError):
        gone.exec_stream("true")
    with pytest.raises(moat.ConflictError):
        gone.exec("true", on_stdout=print)


def test_a_stream_cut_by_a_kill_raises(client: moat.Client, tag: str) -> None:
    sbx = moat.Sandbox.create(client=client, metadata={"test": tag})
    stream = sbx.exec_stream("echo up; sleep 60")
    with pytest.raises(moat.MoatError) as err:
        for ev in stream:
            if isinstance(ev, moat.ExecOutput):
                sbx.kill()
    assert not isinstance(err.value, moat.CommandExitError)


@pytest.mark.asyncio
async def test_async_exec(asandbox: moat.AsyncSandbox) -> None:
    r = await asandbox.exec(
        "echo $X; cat; exit 5", env={"X": "x"}, stdin=b"in", cwd="/tmp", user="root"
    )
    assert (r.stdout, r.exit_code) == ("x\nin", 5)
    timed = await asandbox.exec("sleep 30", timeout=1)
    assert timed.timed_out

    events = [ev async for ev in await asandbox.exec_stream("echo a; sleep 0.2; echo b >&2")]
    assert isinstance(events[0], moat.ExecStart) and isinstance(events[-1], moat.ExecEnd)
    texts = [(e.stream, e.text) for e in events if isinstance(e, moat.ExecOutput)]
    assert texts == [("stdout", "a\n"), ("stderr", "b\n")]

    assert (await (await asandbox.exec_stream("echo w")).wait()).stdout == "w\n"

    got: list[str] = []

    async def collect(text: str) -> None:
        got.append(text)

    r = await asandbox.exec("echo o; echo e >&2", on_stdout=collect, on_stderr=got.append)
    assert sorted(got) == ["e\n", "o\n"] and r.ok

    async with await asandbox.exec_stream("echo go; exec sleep 300") as stream:
        async for ev in stream:
            if isinstance(ev, moat.ExecOutput):
                break
    with pytest.raises(moat.InvalidRequestError):
        await asandbox.exec("true", cwd="nowhere/relative")
