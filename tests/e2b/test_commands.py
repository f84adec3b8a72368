"""Commands and PTYs through the unmodified `e2b` SDK (sync and async) against moat serve."""

import time

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize


@pytest.fixture
def sbx():
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


def test_run_stdout_stderr_and_exit_codes(sbx):
    r = sbx.commands.run("echo out; echo err >&2")
    assert r.exit_code == 0
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"


def test_streaming_callbacks(sbx):
    seen = []
    sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=seen.append)
    assert "".join(seen) == "1\n2\n3\n"


def running(sbx, args):
    """Whether a process with exactly these arguments runs in the sandbox (by `ps`)."""
    ps = sbx.commands.run("ps -eo args")
    lines = ps.stdout.splitlines()
    assert "ps -eo args" in lines, ps.stdout  # ps ran and saw itself
    return args in lines


def test_timeout_kills_the_command(sbx):
    seen = []
    with pytest.raises(TimeoutException):
        sbx.commands.run(
            "echo started; exec sleep 3171", timeout=1, on_stdout=seen.append
        )
    assert "".join(seen) == "started\n"
    # The command is killed, not left running behind the client's timeout. The kill follows
    # the client's hang-up, so it is awaited (a command that is never killed fails here).
    deadline = time.monotonic() + 30
    while running(sbx, "sleep 3171"):
        assert time.monotonic() < deadline, "the timed-out command still runs"
        time.sleep(0.1)
    # The sandbox carries on.
    assert sbx.commands.run("echo still here").stdout == "still here\n"


def test_envs_cwd_and_users(sbx):
    assert sbx.commands.run("echo $FOO", envs={"FOO": "bar"}).stdout == "bar\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("whoami").stdout == "user\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    assert sbx.commands.run("echo $HOME", user="root").stdout == "/root\n"


def test_sandbox_env_vars_reach_every_command():
    sandbox = Sandbox.create(envs={"FROM_CREATE": "yes"})
    try:
        assert sandbox.commands.run("echo $FROM_CREATE").stdout == "yes\n"
    finally:
        sandbox.kill()


def test_background_commands_wait_list_and_kill(sbx):
    h = sbx.commands.run("echo started; sleep 0.3; echo done", background=True)
    r = h.wait()
    assert r.stdout == "started\ndone\n"

    sleeper = sbx.commands.run("sleep 60", background=True)
    pids = [p.pid for p in sbx.commands.list()]
    assert sleeper.pid in pids
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sbx.commands.kill(sleeper.pid) is False


def test_send_stdin_and_close_stdin(sbx):
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "hello\n")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "hello\n"


def test_connect_to_a_running_command(sbx):
    h = sbx.commands.run("sleep 0.5; echo late", background=True)
    again = sbx.commands.connect(h.pid)
    assert again.wait().stdout == "late\n"


def test_pty_create_send_resize(sbx):
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; echo pty-ok; exit\n")
    out = []
    h.wait(on_pty=lambda data: out.append(bytes(data)))
    text = b"".join(out).decode(errors="replace")
    assert "30 100" in text, text
    assert "pty-ok" in text, text


def test_pty_kill(sbx):
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    assert sbx.pty.kill(h.pid) is True
    with pytest.raises(CommandExitException):
        h.wait()


@pytest.mark.asyncio
async def test_async_commands():
    sandbox = await AsyncSandbox.create()
    try:
        r = await sandbox.commands.run("echo async")
        assert r.stdout == "async\n"
        h = await sandbox.commands.run("sleep 0.2; echo bg", background=True)
        r = await h.wait()
        assert r.stdout == "bg\n"
        with pytest.raises(CommandExitException):
            await sandbox.commands.run("exit 7")
        with pytest.raises(TimeoutException):
            await sandbox.commands.run("sleep 30", timeout=1)
    finally:
        await sandbox.kill()
