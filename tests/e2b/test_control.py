"""The E2B control plane through the unmodified SDKs, sync and async: create, get_info,
set_timeout, list (metadata and state filters, paging), connect, metrics and kill, and the
SDK's exceptions for missing sandboxes, bad keys and refused options.

Only control-plane calls: nothing here talks to a sandbox's envd.
"""

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)
from e2b_code_interpreter import Sandbox as CodeInterpreter

MISSING = "aaaaaaaaaaaaaaaaaaaa"
WRONG_KEY = "moat_" + "a" * 40


def listed(query: SandboxQuery, limit: int = 100) -> list:
    """Every page of Sandbox.list."""
    paginator = Sandbox.list(query=query, limit=limit)
    items = []
    while paginator.has_next:
        page = paginator.next_items()
        assert len(page) <= limit
        items.extend(page)
    return items


def test_create_and_get_info(moat, tag):
    sbx = Sandbox.create(
        timeout=120,
        metadata={"suite": tag, "kind": "create"},
        envs={"GREETING": "hello"},
    )
    try:
        assert sbx.sandbox_id.isalnum() and sbx.sandbox_id.islower()
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"suite": tag, "kind": "create"}
        assert info.state == SandboxState.RUNNING
        assert info.cpu_count >= 1 and info.memory_mb > 0
        assert str(info.envd_version) == "0.6.13"
        ttl = info.end_at - info.started_at
        assert timedelta(seconds=110) <= ttl <= timedelta(seconds=120), ttl
        # The class method answers the same.
        again = Sandbox.get_info(sbx.sandbox_id)
        assert again.sandbox_id == info.sandbox_id and again.end_at == info.end_at
    finally:
        sbx.kill()


def test_code_interpreter_template(moat, tag):
    sbx = CodeInterpreter.create(metadata={"suite": tag})
    try:
        assert sbx.get_info().template_id == "code-interpreter-v1"
    finally:
        sbx.kill()


def test_set_timeout(moat, tag):
    sbx = Sandbox.create(timeout=600, metadata={"suite": tag})
    try:
        before = sbx.get_info().end_at
        sbx.set_timeout(30)
        shortened = sbx.get_info().end_at
        assert shortened < before
        assert shortened <= datetime.now(timezone.utc) + timedelta(seconds=31)
        Sandbox.set_timeout(sbx.sandbox_id, 300)
        assert sbx.get_info().end_at > shortened
        with pytest.raises(SandboxException):
            sbx.set_timeout(10**9)
    finally:
        sbx.kill()


def test_list_filters_and_pages(moat, tag):
    made = [
        Sandbox.create(
            metadata={"suite": tag, "i": str(i), "odd key/=&": "v a+l&x=y"},
        )
        for i in range(3)
    ]
    try:
        ids = [s.sandbox_id for s in made]
        # Paged two at a time, newest first.
        everything = listed(SandboxQuery(metadata={"suite": tag}), limit=2)
        assert [s.sandbox_id for s in everything] == ids[::-1]
        assert all(s.state == SandboxState.RUNNING for s in everything)
        assert everything[0].metadata["odd key/=&"] == "v a+l&x=y"
        # Every pair must match; awkward characters survive the double encoding.
        one = listed(
            SandboxQuery(metadata={"suite": tag, "i": "1", "odd key/=&": "v a+l&x=y"})
        )
        assert [s.sandbox_id for s in one] == [ids[1]]
        assert listed(SandboxQuery(metadata={"suite": tag, "i": "9"})) == []
        # States.
        running = listed(SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING]))
        assert len(running) == 3
        paused = listed(SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED]))
        assert paused == []
        # Oldest first on request.
        paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}), order="asc")
        assert [s.sandbox_id for s in paginator.next_items()] == ids
        assert not paginator.has_next
    finally:
        for s in made:
            s.kill()


def test_kill_returns_true_then_false(moat, tag):
    sbx = Sandbox.create(metadata={"suite": tag})
    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert sbx.kill() is False
    assert listed(SandboxQuery(metadata={"suite": tag})) == []
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()


def test_connect_to_a_running_sandbox(moat, tag):
    sbx = Sandbox.create(timeout=60, metadata={"suite": tag})
    try:
        end = sbx.get_info().end_at
        # A shorter timeout leaves the end where it was; a longer one moves it.
        same = Sandbox.connect(sbx.sandbox_id, timeout=5)
        assert same.sandbox_id == sbx.sandbox_id
        assert same.get_info().end_at == end
        sbx.connect(timeout=600)
        assert sbx.get_info().end_at > end
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(MISSING)
    finally:
        sbx.kill()


def test_metrics_are_numbers(moat, tag):
    sbx = Sandbox.create(metadata={"suite": tag})
    try:
        metrics = sbx.get_metrics()
        assert metrics, "at least the sample taken now"
        m = metrics[-1]
        assert m.cpu_count >= 1
        assert 0.0 <= m.cpu_used_pct <= 100.0
        assert 0 < m.mem_used <= m.mem_total
        assert 0 <= m.disk_used <= m.disk_total and m.disk_total > 0
        assert abs(m.timestamp - datetime.now(timezone.utc)) < timedelta(hours=1)
    finally:
        sbx.kill()


def test_missing_sandboxes_raise_the_sdks_exceptions(moat):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(MISSING)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(MISSING, 30)
    assert Sandbox.kill(MISSING) is False


def test_idempotency_key(moat, tag):
    first = Sandbox.create(metadata={"suite": tag}, idempotency_key=f"create-{tag}")
    try:
        again = Sandbox.create(metadata={"suite": tag}, idempotency_key=f"create-{tag}")
        assert again.sandbox_id == first.sandbox_id
        assert len(listed(SandboxQuery(metadata={"suite": tag}))) == 1
    finally:
        first.kill()


def test_bad_key_and_refused_options(moat, tag):
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=WRONG_KEY)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=WRONG_KEY).next_items()
    with pytest.raises(SandboxException, match="egressProxy"):
        Sandbox.create(network={"egress_proxy": {"address": "proxy.example:1080"}})
    with pytest.raises(SandboxException, match="autoPauseMemory"):
        Sandbox.create(lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    with pytest.raises(SandboxException, match="Timeout cannot be greater"):
        Sandbox.create(timeout=10**9)
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.create(template="no-such-template")
    # What moat does anyway is accepted: no network, killed at the timeout.
    sbx = Sandbox.create(
        allow_internet_access=False,
        lifecycle={"on_timeout": "kill"},
        metadata={"suite": tag},
    )
    sbx.kill()
    assert listed(SandboxQuery(metadata={"suite": tag})) == []


def test_async_client(moat, tag):
    async def scenario():
        sbx = await AsyncSandbox.create(
            timeout=120, metadata={"suite": tag, "client": "async"}, envs={"A": "1"}
        )
        try:
            info = await sbx.get_info()
            assert info.sandbox_id == sbx.sandbox_id
            assert info.metadata == {"suite": tag, "client": "async"}
            assert info.state == SandboxState.RUNNING

            await sbx.set_timeout(30)
            assert (await sbx.get_info()).end_at < info.end_at

            other = await AsyncSandbox.create(metadata={"suite": tag, "client": "async"})
            paginator = AsyncSandbox.list(
                query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING]),
                limit=1,
            )
            seen = []
            while paginator.has_next:
                seen.extend(await paginator.next_items())
            assert [s.sandbox_id for s in seen] == [other.sandbox_id, sbx.sandbox_id]

            connected = await AsyncSandbox.connect(sbx.sandbox_id, timeout=300)
            assert connected.sandbox_id == sbx.sandbox_id
            assert (await connected.get_info()).end_at > info.end_at - timedelta(seconds=90)

            metrics = await sbx.get_metrics()
            assert metrics and metrics[-1].mem_total > 0

            assert await other.kill() is True
            assert await AsyncSandbox.kill(other.sandbox_id) is False
            with pytest.raises(SandboxNotFoundException):
                await AsyncSandbox.get_info(MISSING)
            with pytest.raises(SandboxNotFoundException):
                await AsyncSandbox.connect(MISSING)
            with pytest.raises(AuthenticationException):
                await AsyncSandbox.create(api_key=WRONG_KEY)
        finally:
            await sbx.kill()

    asyncio.run(scenario())
