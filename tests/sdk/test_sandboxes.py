"""Sandbox lifecycle through the SDK: create, connect, list, info, timeouts, pause and resume,
snapshots, forks, network policies and kill, sync and async."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

import moat


def test_create_with_options_info_and_kill(client: moat.Client, tag: str) -> None:
    sbx = moat.Sandbox.create(
        "host",
        client=client,
        timeout=90,
        env={"GREETING": "hello"},
        metadata={"test": tag, "role": "main"},
        resources=moat.Resources(memory="256M", cpus=0.5, pids=64, disk="128M"),
        network=False,
    )
    try:
        info = sbx.last_info
        assert sbx.client is client and repr(sbx) == f"Sandbox(id={sbx.id!r}, template='host')"
        assert info.state == "running" and info.is_running and info.is_active
        assert info.template == "host"
        assert info.metadata == {"test": tag, "role": "main"}
        assert info.resources.memory_bytes == 256 << 20
        assert info.resources.cpus == 0.5
        assert info.resources.pids == 64
        assert info.resources.disk_bytes == 128 << 20
        assert info.access_token and info.traffic_access_token
        assert info.expires_at is not None
        left = (info.expires_at - datetime.now(timezone.utc)).total_seconds()
        assert 60 < left <= 91
        assert info.lifecycle == moat.Lifecycle()
        assert sbx.exec("echo $GREETING").stdout == "hello\n"
        assert sbx.is_running()

        # A dict is as good as the dataclass for resources.
        with moat.Sandbox.create(
            client=client, resources={"memory": 128 << 20}, metadata={"test": tag}
        ) as small:
            assert small.info().resources.memory_bytes == 128 << 20

        again = moat.Sandbox.connect(sbx.id, client=client)
        assert again.id == sbx.id and again.last_info.access_token == info.access_token

        updated = sbx.set_timeout(30)
        assert updated.expires_at is not None and updated.expires_at < info.expires_at
    finally:
        sbx.kill()
    ended = sbx.info()
    assert ended.state == "killed" and ended.end_reason == "deleted" and ended.ended_at is not None
    assert not sbx.is_running()
    # Killing an ended sandbox changes nothing and is no error.
    sbx.kill()


def test_context_manager_kills_and_closes(tag: str, server: tuple[str, str]) -> None:
    with moat.Sandbox.create(metadata={"test": tag}, timeout=60) as sbx:
        sid = sbx.id
        assert sbx.exec("true").ok
    with moat.Client() as c:
        assert moat.Sandbox.connect(sid, client=c).last_info.state == "killed"
    # Its own connection is closed with the block.
    with pytest.raises(moat.MoatError, match="closed"):
        sbx.info()


def test_list_filters_by_state_metadata_and_limit(client: moat.Client, tag: str) -> None:
    made = [
        moat.Sandbox.create(client=client, metadata={"test": tag, "n": str(i)}, timeout=60)
        for i in range(3)
    ]
    try:
        listed = moat.Sandbox.list(client=client, metadata={"test": tag})
        assert [s.id for s in listed] == [s.id for s in made]  # oldest first
        assert all(s.access_token is None for s in listed)  # listings carry no tokens
        assert [
            s.id for s in moat.Sandbox.list(client=client, metadata={"test": tag, "n": "1"})
        ] == [made[1].id]
        assert len(moat.Sandbox.list(client=client, metadata={"test": tag}, limit=2)) == 2
        made[0].kill()
        running = moat.Sandbox.list(client=client, metadata={"test": tag}, state="running")
        assert {s.id for s in running} == {made[1].id, made[2].id}
        ended = moat.Sandbox.list(client=client, metadata={"test": tag}, state=["killed", "failed"])
        assert [s.id for s in ended] == [made[0].id]
        with pytest.raises(ValueError, match="state"):
            moat.Sandbox.list(client=client, state="sleeping")
    finally:
        for s in made:
            s.kill()


def test_pause_resume_and_auto_resume(client: moat.Client, tag: str) -> None:
    with moat.Sandbox.create(client=client, metadata={"test": tag}, timeout=60) as sbx:
        sbx.exec("echo kept > ~/state")
        assert sbx.pause().state == "paused"
        with pytest.raises(moat.ConflictError) as err:
            sbx.exec("true")
        assert err.value.status == 409 and err.value.code == "conflict"
        with pytest.raises(moat.ConflictError):
            sbx.pause()
        assert sbx.resume(timeout=45).state == "running"
        assert sbx.files.read_text("state") == "kept\n"
        with pytest.raises(moat.ConflictError):
            sbx.resume()

    with moat.Sandbox.create(
        client=client, metadata={"test": tag}, timeout=60, on_timeout="pause", auto_resume=True
    ) as sbx:
        assert sbx.last_info.lifecycle == moat.Lifecycle(on_timeout="pause", auto_resume=True)
        sbx.pause()
        # A call that needs it resumes it first.
        assert sbx.exec("echo awake").stdout == "awake\n"
        assert sbx.info().state == "running"


def test_snapshots_and_sandboxes_from_them(client: moat.Client, tag: str) -> None:
    with moat.Sandbox.create(client=client, metadata={"test": tag}, timeout=60) as sbx:
        sbx.files.write("work/data.txt", "from the source")
        snap = sbx.snapshot(f"snap-{tag}")
        assert snap.name == f"snap-{tag}" and snap.sandbox_id == sbx.id and not snap.memory
        assert snap.size_bytes > 0 and snap.template == "host"
        unnamed = sbx.snapshot()
        assert unnamed.name is None
    try:
        assert client.snapshots.get(snap.id) == snap
        assert [s.id for s in client.snapshots.list(sandbox_id=sbx.id)] == [snap.id, unnamed.id]
        assert [s.id for s in client.snapshots.list(name=f"snap-{tag}")] == [snap.id]
        assert len(client.snapshots.list(sandbox_id=sbx.id, limit=1)) == 1
        with moat.Sandbox.create(client=client, snapshot=snap.id, metadata={"test": tag}) as copy:
            assert copy.files.read_text("work/data.txt") == "from the source"
        with pytest.raises(ValueError, match="snapshot"):
            moat.Sandbox.create(client=client, snapshot=snap.id, template="host")
        with pytest.raises(ValueError, match="resources"):
            moat.Sandbox.create(client=client, snapshot=snap.id, resources={"memory": "1G"})
    finally:
        client.snapshots.delete(snap.id)
        client.snapshots.delete(unnamed.id)
    with pytest.raises(moat.NotFoundError):
        client.snapshots.get(snap.id)
    with pytest.raises(moat.NotFoundError):
        moat.Sandbox.create(client=client, snapshot=snap.id)


def test_fork_copies_files_into_new_sandboxes(client: moat.Client, tag: str) -> None:
    with moat.Sandbox.create(client=client, metadata={"test": tag}, timeout=60) as sbx:
        sbx.files.write("f.txt", "forked")
        result = sbx.fork(2, timeout=60, metadata={"test": tag, "fork": "yes"})
        try:
            assert len(result) == 2 and result.errors == []
            for copy in result:
                assert copy.id != sbx.id
                assert copy.files.read_text("f.txt") == "forked"
                assert copy.info().metadata["fork"] == "yes"
                # A copy's answer carries its tokens: its code interpreter is reachable.
                assert copy.run_code("6 * 7").text == "42"
        finally:
            for copy in result:
                copy.kill()
        with pytest.raises(ValueError, match="count"):
            sbx.fork(21)


def test_fork_reports_copies_over_quota(client: moat.Client, user_key: moat.CreatedKey) -> None:
    with (
        moat.Client(api_key=user_key.secret) as uc,
        moat.Sandbox.create(client=uc, timeout=60) as sbx,
    ):
        result = sbx.fork(1)
        assert result.sandboxes == []
        (err,) = result.errors
        assert isinstance(err, moat.QuotaExceededError) and err.status == 429


def test_network_policy(sandbox: moat.Sandbox) -> None:
    assert sandbox.get_network().network == moat.Network()
    net = sandbox.set_network(moat.Network(allow=("pypi.org",), deny=("0.0.0.0/0",)))
    assert net.network.allow == ("pypi.org",)
    assert net.stats is not None and net.stats.connections == 0
    assert sandbox.get_network().network.deny == ("0.0.0.0/0",)
    assert sandbox.set_network(False).network == moat.Network()
    with pytest.raises(moat.InvalidRequestError) as err:
        sandbox.set_network({"allow": ["not a rule!"]})
    assert err.value.code == "invalid" and "allow" in err.value.message


def test_bad_arguments_fail_before_the_server(client: moat.Client) -> None:
    with pytest.raises(ValueError, match="timeout"):
        moat.Sandbox.create(client=client, timeout=0)
    with pytest.raises(TypeError, match="env"):
        moat.Sandbox.create(client=client, env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unknown resources"):
        moat.Sandbox.create(client=client, resources={"ram": "1G"})
    with pytest.raises(ValueError, match="cpus"):
        moat.Resources(cpus=-1)
    with pytest.raises(ValueError, match="on_timeout"):
        moat.Sandbox.create(client=client, on_timeout="sleep")
    with pytest.raises(ValueError, match="not both"):
        moat.Sandbox.create(client=client, url="http://127.0.0.1:1")
    with pytest.raises(ValueError):
        moat.Sandbox.connect("", client=client)
    # An id is one path segment, never a path of its own: the sandbox route refuses it.
    with pytest.raises(moat.InvalidRequestError, match="sandbox id"):
        moat.Sandbox.connect("../templates", client=client)


def test_server_side_refusals(client: moat.Client) -> None:
    with pytest.raises(moat.InvalidRequestError, match="no-such-template"):
        moat.Sandbox.create(client=client, template="no-such-template")
    with pytest.raises(moat.NotFoundError) as err:
        moat.Sandbox.connect("a" * 20, client=client)
    assert err.value.status == 404 and err.value.code == "not_found"
    with pytest.raises(moat.InvalidRequestError) as bad:
        moat.Sandbox.create(client=client, resources={"memory": "lots"})
    assert bad.value.status == 400 and bad.value.code == "invalid"
    with pytest.raises(moat.InvalidRequestError):
        moat.Sandbox.create(client=client, timeout=10**9)


@pytest.mark.asyncio
async def test_async_lifecycle(aclient: moat.AsyncClient, tag: str) -> None:
    sbx = await moat.AsyncSandbox.create(
        client=aclient,
        timeout=60,
        env={"A": "1"},
        metadata={"test": tag},
        resources={"memory": "256M"},
    )
    try:
        assert sbx.last_info.state == "running"
        assert (await sbx.info()).resources.memory_bytes == 256 << 20
        assert (await sbx.exec("echo $A")).stdout == "1\n"
        assert await sbx.is_running()
        again = await moat.AsyncSandbox.connect(sbx.id, client=aclient)
        assert again.id == sbx.id
        listed = await moat.AsyncSandbox.list(
            client=aclient, metadata={"test": tag}, state="running"
        )
        assert [s.id for s in listed] == [sbx.id]
        before = sbx.last_info.expires_at
        after = (await sbx.set_timeout(20)).expires_at
        assert before is not None and after is not None and after < before
        assert (await sbx.pause()).state == "paused"
        assert (await sbx.resume(timeout=60)).state == "running"
        snap = await sbx.snapshot("async")
        assert (await aclient.snapshots.get(snap.id)).id == snap.id
        assert [s.id for s in await aclient.snapshots.list(sandbox_id=sbx.id)] == [snap.id]
        async with await moat.AsyncSandbox.create(
            client=aclient, snapshot=snap.id, metadata={"test": tag}
        ) as copy:
            assert (await copy.exec("echo $A")).stdout == "1\n"
        await aclient.snapshots.delete(snap.id)
        forks = await sbx.fork(1, metadata={"test": tag})
        assert len(forks) == 1
        for f in forks:
            await f.kill()
        assert (await sbx.get_network()).network == moat.Network()
        assert (await sbx.set_network(True)).network.internet
    finally:
        await sbx.kill()
    assert (await sbx.info()).state == "killed"
    with pytest.raises(moat.NotFoundError):
        await moat.AsyncSandbox.connect("a" * 20, client=aclient)


@pytest.mark.asyncio
async def test_async_context_manager_with_its_own_client(tag: str, server: tuple[str, str]) -> None:
    async with await moat.AsyncSandbox.create(metadata={"test": tag}, timeout=60) as sbx:
        sid = sbx.id
    async with moat.AsyncClient() as c:
        assert (await moat.AsyncSandbox.connect(sid, client=c)).last_info.state == "killed"


def test_expired_sandbox_is_killed(client: moat.Client, tag: str) -> None:
    sbx = moat.Sandbox.create(client=client, timeout=1, metadata={"test": tag})
    deadline = time.monotonic() + 15
    while sbx.info().state != "killed":
        assert time.monotonic() < deadline, "the sandbox outlived its time to live"
        time.sleep(0.2)
    assert sbx.last_info.end_reason == "ttl"
    with pytest.raises(moat.ConflictError):
        sbx.exec("true")
