"""Errors, API keys and quotas through the SDK: what each failure raises, what is retried and
what is not, and configuration from the environment."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

import moat


def test_quota_of_a_user_key(client: moat.Client, user_key: moat.CreatedKey) -> None:
    assert (
        user_key.role == "user"
        and user_key.quotas.max_sandboxes == 1
        and user_key.secret.startswith("moat_")
    )
    with moat.Client(api_key=user_key.secret) as uc:
        first = moat.Sandbox.create(client=uc, timeout=60)
        try:
            with pytest.raises(moat.QuotaExceededError) as err:
                moat.Sandbox.create(client=uc, timeout=60)
            assert err.value.status == 429 and err.value.code == "quota_exceeded"
            assert not isinstance(err.value, moat.RateLimitError)
            assert "quota" in err.value.message and str(err.value).endswith("(429 quota_exceeded)")
        finally:
            first.kill()
        # With the first gone there is room again.
        moat.Sandbox.create(client=uc, timeout=60).kill()
        # Another tenant's sandbox does not exist for this key.
        with moat.Sandbox.create(client=client, timeout=60) as admins:
            with pytest.raises(moat.NotFoundError):
                moat.Sandbox.connect(admins.id, client=uc)
        # Key management is for admin keys.
        with pytest.raises(moat.PermissionDeniedError) as denied:
            uc.keys.list()
        assert denied.value.status == 403 and denied.value.code == "forbidden"


@pytest.mark.asyncio
async def test_async_quota(user_key: moat.CreatedKey) -> None:
    async with moat.AsyncClient(api_key=user_key.secret) as uc:
        async with await moat.AsyncSandbox.create(client=uc, timeout=60):
            with pytest.raises(moat.QuotaExceededError):
                await moat.AsyncSandbox.create(client=uc, timeout=60)


def test_keys(client: moat.Client) -> None:
    tenant = "sdkkeys" + moat.__version__.replace(".", "")
    key = client.keys.create(
        "limited",
        tenant=tenant,
        max_sandboxes=2,
        max_memory="1G",
        max_pids=500,
        max_snapshot_size="2G",
        requests_per_minute=600,
    )
    q = key.quotas
    assert (q.max_sandboxes, q.max_memory_bytes, q.max_pids) == (2, 1 << 30, 500)
    assert (q.max_snapshot_bytes, q.requests_per_minute) == (2 << 30, 600)
    assert key.tenant == tenant and key.revoked_at is None and key.id.startswith("key_")
    assert "secret" not in repr(key) and key.secret not in repr(key)
    admin = client.keys.create("ops", tenant=tenant, role="admin")
    listed = client.keys.list(tenant=tenant)
    assert [k.id for k in listed][-2:] == [key.id, admin.id] and listed[-1].role == "admin"
    assert not hasattr(listed[0], "secret")

    with moat.Client(api_key=key.secret) as kc:
        assert moat.Sandbox.list(client=kc) == []
        revoked = client.keys.revoke(key.id, tenant=tenant)
        assert revoked.revoked_at is not None
        with pytest.raises(moat.AuthenticationError) as err:
            moat.Sandbox.list(client=kc)
        assert err.value.status == 401 and err.value.code == "unauthenticated"
    client.keys.revoke(admin.id, tenant=tenant)

    with pytest.raises(ValueError, match="role"):
        client.keys.create("x", role="root")
    with pytest.raises(ValueError, match="max_sandboxes"):
        client.keys.create("x", max_sandboxes=0)
    with pytest.raises(moat.InvalidRequestError):
        client.keys.create("x", tenant="Not A Tenant")
    with pytest.raises(moat.NotFoundError):
        client.keys.revoke("key_" + "a" * 16)


@pytest.mark.asyncio
async def test_async_keys(aclient: moat.AsyncClient) -> None:
    key = await aclient.keys.create("async", tenant="sdkasync", max_memory=512 << 20)
    assert key.quotas.max_memory_bytes == 512 << 20
    assert key.id in [k.id for k in await aclient.keys.list(tenant="sdkasync")]
    assert (await aclient.keys.revoke(key.id, tenant="sdkasync")).revoked_at is not None
    async with moat.AsyncClient(api_key=key.secret) as kc:
        with pytest.raises(moat.AuthenticationError):
            await kc.templates.list()
    assert "paths" in await aclient.openapi()


def test_rate_limit(client: moat.Client) -> None:
    key = client.keys.create("slow", requests_per_minute=1, tenant="sdkrate")
    with moat.Client(api_key=key.secret, retries=0) as kc:
        moat.Sandbox.list(client=kc)
        with pytest.raises(moat.RateLimitError) as err:
            moat.Sandbox.list(client=kc)
    assert isinstance(err.value, moat.QuotaExceededError)
    assert err.value.status == 429 and err.value.code == "rate_limited"
    assert err.value.retry_after is not None and err.value.retry_after >= 1
    client.keys.revoke(key.id, tenant="sdkrate")


def test_configuration(monkeypatch: pytest.MonkeyPatch, server: tuple[str, str]) -> None:
    url, key = server
    monkeypatch.delenv("MOAT_URL")
    with pytest.raises(moat.ConfigurationError, match="MOAT_URL"):
        moat.Client()
    with pytest.raises(moat.ConfigurationError, match="MOAT_URL"):
        moat.Sandbox.create()
    monkeypatch.setenv("MOAT_URL", url + "/")
    monkeypatch.delenv("MOAT_API_KEY")
    with pytest.raises(moat.ConfigurationError, match="MOAT_API_KEY"):
        moat.Client()
    # Arguments take the place of the environment.
    with moat.Client(api_key=key) as c:
        assert c.url == url.rstrip("/")
        assert "paths" in c.openapi()
    with pytest.raises(moat.ConfigurationError):
        moat.Client(url="ftp://host", api_key=key)
    with pytest.raises(moat.ConfigurationError):
        moat.Client(url=url, api_key="two words")
    with moat.Client(url=url, api_key="moat_" + "x" * 40) as bad:
        with pytest.raises(moat.AuthenticationError):
            bad.templates.list()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server() -> None:
    with moat.Client(url=f"http://127.0.0.1:{_closed_port()}", api_key="k", retries=1) as c:
        with pytest.raises(moat.MoatConnectionError) as err:
            c.templates.list()
    assert isinstance(err.value, ConnectionError) and err.value.status is None


class _Script:
    """A fake server answering from a script, counting what it was asked."""

    def __init__(self, answers: list[httpx.Response | Exception]) -> None:
        self.answers: Iterator[httpx.Response | Exception] = iter(answers)
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.method)
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _busy() -> httpx.Response:
    return httpx.Response(
        503,
        json={"error": {"code": "unavailable", "message": "busy"}},
        headers={"Retry-After": "0"},
    )


_TEMPLATES = {"templates": []}


def test_only_safe_requests_are_retried() -> None:
    # A GET that met a 503, then could not connect, is tried again (twice at most).
    script = _Script([_busy(), httpx.ConnectError("refused"), httpx.Response(200, json=_TEMPLATES)])
    with _fake(script) as c:
        assert c.templates.list() == []
    assert script.calls == ["GET", "GET", "GET"]

    script = _Script([_busy(), _busy(), _busy()])
    with _fake(script) as c, pytest.raises(moat.UnavailableError) as err:
        c.templates.list()
    assert script.calls == ["GET"] * 3 and err.value.status == 503 and err.value.message == "busy"

    # A create is never repeated: it may have happened. Nor is any other change.
    script = _Script([_busy()])
    with _fake(script) as c, pytest.raises(moat.UnavailableError):
        moat.Sandbox.create(client=c)
    assert script.calls == ["POST"]
    script = _Script([httpx.ConnectError("refused")])
    with _fake(script) as c, pytest.raises(moat.MoatConnectionError):
        c.templates.delete("x")
    assert script.calls == ["DELETE"]

    # Other errors are not retried either.
    script = _Script(
        [httpx.Response(404, json={"error": {"code": "not_found", "message": "gone"}})]
    )
    with _fake(script) as c, pytest.raises(moat.NotFoundError):
        c.templates.get("x")
    assert script.calls == ["GET"]


@pytest.mark.asyncio
async def test_async_retries() -> None:
    script = _Script([_busy(), httpx.Response(200, json=_TEMPLATES)])
    fake = httpx.AsyncClient(transport=httpx.MockTransport(script))
    async with moat.AsyncClient(url="http://moat.test", api_key="k", http_client=fake) as c:
        assert await c.templates.list() == []
        script.answers = iter([_busy()])
        with pytest.raises(moat.UnavailableError):
            await c.run("print(1)")
    await fake.aclose()
    assert script.calls == ["GET", "GET", "POST"]


def _fake(script: _Script, retries: int = 2) -> moat.Client:
    return moat.Client(
        url="http://moat.test",
        api_key="k",
        retries=retries,
        http_client=httpx.Client(transport=httpx.MockTransport(script)),
    )


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid", moat.InvalidRequestError),
        (401, "unauthenticated", moat.AuthenticationError),
        (403, "forbidden", moat.PermissionDeniedError),
        (404, "not_found", moat.NotFoundError),
        (409, "is_a_directory", moat.ConflictError),
        (413, "payload_too_large", moat.PayloadTooLargeError),
        (429, "quota_exceeded", moat.QuotaExceededError),
        (429, "rate_limited", moat.RateLimitError),
        (500, "internal", moat.InternalServerError),
        (501, "unsupported", moat.UnsupportedError),
        (503, "unavailable", moat.UnavailableError),
        (504, "timeout", moat.SandboxTimeoutError),
        (507, "insufficient_storage", moat.InsufficientStorageError),
        (418, "teapot", moat.MoatError),
    ],
)
def test_status_to_exception(status: int, code: str, cls: type[moat.MoatError]) -> None:
    body = {"error": {"code": code, "message": "what went wrong"}}
    script = _Script([httpx.Response(status, json=body)])
    with _fake(script, retries=0) as c, pytest.raises(cls) as err:
        c.templates.list()
    assert type(err.value) is cls
    assert (err.value.status, err.value.code, err.value.message) == (
        status,
        code,
        "what went wrong",
    )


def test_the_proxy_s_answer_for_a_sandbox_that_does_not_run_is_a_conflict() -> None:
    body = {"sandboxId": "x", "message": "The sandbox was not found", "code": 502}
    script = _Script([httpx.Response(502, json=body), httpx.Response(405, text="no")])
    with _fake(script, retries=0) as c:
        with pytest.raises(moat.ConflictError) as err:
            c.templates.list()
        assert err.value.code == "not_running"
        with pytest.raises(moat.InvalidRequestError):
            c.templates.list()


def test_slow_calls_wait_as_long_as_the_server_may_take() -> None:
    from moat import sandbox as ops

    create = ops.create_op(
        None,
        snapshot=None,
        timeout=None,
        env=None,
        metadata=None,
        resources=None,
        network=None,
        public_traffic=None,
        lifecycle=None,
    )
    for op in [create, ops.snapshot_op("s", None, False), ops.pause_op("s")]:
        assert op.slow is not None and op.slow.read is not None and op.slow.read > 900
    fork = ops.fork_op("s", 1, None, None, False).slow
    assert fork is not None and fork.read is not None and fork.read > 1500
    with pytest.raises(ValueError, match="'='"):
        ops.list_op(None, {"a=b": "c"}, None, 10)


def test_errors_without_the_api_s_body() -> None:
    script = _Script([httpx.Response(502, text="bad gateway")])
    with _fake(script, retries=0) as c, pytest.raises(moat.UnavailableError) as err:
        c.templates.list()
    assert err.value.status == 502 and err.value.code is None and err.value.message == "bad gateway"
