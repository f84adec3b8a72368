"""Sandbox lifecycle through the unmodified `e2b` SDK: running checks, connect, pause and
resume, snapshots, and the errors for sandboxes that do not exist."""

import threading
import time

import pytest
from e2b import (
    Sandbox,
    SandboxException,
    NotFoundException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
)


def test_is_running_connect_and_kill():
    sbx = Sandbox.create()
    assert sbx.is_running() is True
    same = Sandbox.connect(sbx.sandbox_id)
    assert same.commands.run("echo again").stdout == "again\n"
    assert sbx.kill() is True
    assert sbx.is_running() is False
    assert Sandbox.kill(sbx.sandbox_id) is False


def test_missing_sandboxes_raise_the_sdk_classes():
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("doesnotexist0000")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("doesnotexist0000")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout("doesnotexist0000", 30)


def test_pause_and_resume_keep_processes_and_files():
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/kept.txt", "still here")
        sleeper = sbx.commands.run("sleep 600", background=True)
        assert sbx.pause() is True
        assert sbx.pause() is False
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        listed = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sbx.sandbox_id in [s.sandbox_id for s in listed]
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
        assert resumed.files.read("/home/user/kept.txt") == "still here"
        assert sleeper.pid in [p.pid for p in resumed.commands.list()]
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_filesystem_snapshots():
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/state.txt", "prepared")
        snap = sbx.create_snapshot(mode="filesystem")
        assert snap.snapshot_id
        ids = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()]
        assert snap.snapshot_id in ids
        child = Sandbox.create(snap.snapshot_id)
        try:
            assert child.files.read("/home/user/state.txt") == "prepared"
            child.files.write("/home/user/state.txt", "changed")
            assert sbx.files.read("/home/user/state.txt") == "prepared"
        finally:
            child.kill()
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    finally:
        sbx.kill()


COUNTER = (
    "python3 -c 'import os, time\n"
    "i = 0\n"
    "while True:\n"
    "    i += 1\n"
    "    open(\"/tmp/n.new\", \"w\").write(str(i))\n"
    "    os.rename(\"/tmp/n.new\", \"/tmp/n\")\n"
    "    time.sleep(0.02)' >/dev/null 2>&1"
)


def counting(sbx, above=5):
    """The count of `sbx`'s COUNTER once it is past `above` (Python starts slowly under a
    loaded sentry: wait for it, within a bound)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            n = int(sbx.files.read("/tmp/n"))
            if n > above:
                return n
        except NotFoundException:
            pass
        assert time.monotonic() < deadline, "the counter never got going"
        time.sleep(0.1)


def advances(sbx, past):
    """Waits until `sbx`'s COUNTER is above `past`: it runs on (a restored or forked copy
    counts on), however slowly a loaded machine lets it."""
    deadline = time.monotonic() + 30
    while int(sbx.files.read("/tmp/n")) <= past:
        assert time.monotonic() < deadline, f"the counter stopped at {past}"
        time.sleep(0.1)


def test_memory_snapshots_of_gvisor_sandboxes_go_on_counting():
    # The suite's server has a template `gvisor` (see crates/moat/tests/e2b_sdk.rs).
    sbx = Sandbox.create("gvisor")
    try:
        sbx.commands.run(COUNTER, background=True)
        before = counting(sbx)
        snap = sbx.create_snapshot()
        child = Sandbox.create(snap.snapshot_id)
        try:
            first = int(child.files.read("/tmp/n"))
            assert first >= before
            advances(child, first)
            assert int(sbx.files.read("/tmp/n")) >= before
        finally:
            child.kill()
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    finally:
        sbx.kill()


def test_pause_of_a_gvisor_sandbox_saves_it_and_connect_goes_on():
    sbx = Sandbox.create("gvisor")
    try:
        sbx.commands.run(COUNTER, background=True)
        before = counting(sbx)
        assert sbx.pause() is True
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        resumed = Sandbox.connect(sbx.sandbox_id)
        after = int(resumed.files.read("/tmp/n"))
        assert after >= before
        advances(resumed, after)
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_timeout_pauses_and_a_command_resumes_with_the_lifecycle():
    # On gvisor: paused to disk at its timeout, resumed by the next call, still counting.
    sbx = Sandbox.create(
        "gvisor",
        timeout=3,
        lifecycle={"on_timeout": "pause", "auto_resume": True},
    )
    try:
        info = Sandbox.get_info(sbx.sandbox_id)
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
        sbx.commands.run(COUNTER, background=True)
        before = counting(sbx)
        deadline = time.monotonic() + 30
        while Sandbox.get_info(sbx.sandbox_id).state.value != "paused":
            assert time.monotonic() < deadline, "never paused at its timeout"
            time.sleep(0.2)
        # Any call resumes it: here a command, through envd.
        after = int(sbx.commands.run("cat /tmp/n").stdout)
        assert after >= before
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
        advances(sbx, after)
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_pause_lets_calls_under_way_finish_and_auto_resume_takes_the_next():
    # Saved to disk, a gvisor sandbox's agent connection ends: a read under way must finish
    # before that, and reads that come during the pause wait for it and resume the sandbox.
    sbx = Sandbox.create("gvisor", lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        size = 8 * 1024 * 1024
        sbx.commands.run(f"head -c {size} /dev/zero > /tmp/big")
        failures, reads, stop = [], [], threading.Event()

        def reader():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    data = sbx.files.read("/tmp/big", format="bytes")
                    reads.append((started, len(data)))
                except Exception as e:  # every failure is one the test reports
                    failures.append(repr(e))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            paused_at = time.monotonic()
            for _ in range(3):
                # Two whole reads begun after the last pause (the first one resumed it).
                deadline = time.monotonic() + 60
                while len([r for r in reads if r[0] > paused_at]) < 2 and not failures:
                    assert time.monotonic() < deadline, "reads stopped"
                    time.sleep(0.05)
                assert failures == []
                assert sbx.pause() is True
                paused_at = time.monotonic()
        finally:
            stop.set()
            thread.join(timeout=60)
        assert failures == []
        assert {n for _, n in reads} == {size}
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_a_timeout_pause_without_auto_resume_waits_for_connect():
    sbx = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause", "auto_resume": False})
    try:
        sbx.files.write("/tmp/kept", "still here")
        deadline = time.monotonic() + 30
        while Sandbox.get_info(sbx.sandbox_id).state.value != "paused":
            assert time.monotonic() < deadline, "never paused at its timeout"
            time.sleep(0.2)
        # Paused with no time to live: it does not end.
        time.sleep(3)
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
        with pytest.raises(SandboxNotRunningException):
            sbx.commands.run("true", request_timeout=10)
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.files.read("/tmp/kept") == "still here"
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_fork_of_a_gvisor_sandbox_copies_its_running_processes():
    sbx = Sandbox.create("gvisor")
    try:
        sbx.commands.run(COUNTER, background=True)
        before = counting(sbx)
        forks = sbx.fork(count=2)
        assert len(forks) == 2
        try:
            for f in forks:
                assert isinstance(f, Sandbox), f
                first = int(f.files.read("/tmp/n"))
                assert first >= before
            for f in forks:
                advances(f, before)
            forks[0].files.write("/tmp/mark", "a")
            assert not forks[1].files.exists("/tmp/mark")
        finally:
            for f in forks:
                if isinstance(f, Sandbox):
                    f.kill()
    finally:
        sbx.kill()


def test_memory_snapshots_are_refused_clearly():
    sbx = Sandbox.create()
    try:
        with pytest.raises(SandboxException) as info:
            sbx.create_snapshot()
        assert "filesystem" in str(info.value)
    finally:
        sbx.kill()


def test_fork_copies_the_filesystem():
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/seed.txt", "shared start")
        forks = sbx.fork(count=2)
        assert len(forks) == 2
        try:
            for f in forks:
                assert isinstance(f, Sandbox), f
                assert f.sandbox_id != sbx.sandbox_id
                assert f.files.read("/home/user/seed.txt") == "shared start"
            forks[0].files.write("/home/user/seed.txt", "diverged")
            assert forks[1].files.read("/home/user/seed.txt") == "shared start"
        finally:
            for f in forks:
                if isinstance(f, Sandbox):
                    f.kill()
    finally:
        sbx.kill()
