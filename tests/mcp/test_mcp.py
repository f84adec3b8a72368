"""moat's MCP server with the official `mcp` Python client: over streamable HTTP (`/mcp`) and
over stdio (`moat mcp`), against a real `moat serve` (MOAT_URL, MOAT_API_KEY, MOAT_BIN set by
crates/moat/tests/mcp.rs)."""

import json
import os
import pathlib
import re
import time
import urllib.request

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client

URL = os.environ["MOAT_URL"]
KEY = os.environ["MOAT_API_KEY"]


def running_mcp_sandboxes():
    req = urllib.request.Request(
        f"{URL}/v1/sandboxes?state=running&metadata=moat.mcp%3Dtrue",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req) as r:
        return [s["id"] for s in json.load(r)["sandboxes"]]


def gone_soon(ids):
    """Whether the sandboxes `ids` stop running within 10 s (a session's end destroys its
    sandboxes in the background)."""
    deadline = time.monotonic() + 10
    while set(running_mcp_sandboxes()) & ids:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def text(result):
    return "".join(c.text for c in result.content)


async def exercise(session):
    """The tools a model would use, each checked."""
    await session.initialize()
    names = {t.name for t in (await session.list_tools()).tools}
    assert names == {
        "run_code",
        "run_command",
        "write_file",
        "read_file",
        "list_files",
        "create_sandbox",
        "list_sandboxes",
        "kill_sandbox",
    }
    for t in (await session.list_tools()).tools:
        assert t.description and len(t.description) > 20, t.name

    r = await session.call_tool("run_code", {"code": "import sys\nprint(6 * 7)\nprint('warn', file=sys.stderr)"})
    assert not r.isError, text(r)
    assert "stdout:\n42\n" in text(r) and "stderr:\nwarn" in text(r), text(r)

    # Like a notebook: state persists, the last expression is the result.
    await session.call_tool("run_code", {"code": "x = 41"})
    r = await session.call_tool("run_code", {"code": "x + 1"})
    assert "result:\n42" in text(r), text(r)

    r = await session.call_tool("run_code", {"code": "raise ValueError('boom')"})
    assert r.isError and "error: ValueError: boom" in text(r) and "Traceback" in text(r), text(r)

    r = await session.call_tool("run_code", {"code": "echo from-bash", "language": "bash"})
    assert "from-bash" in text(r), text(r)

    r = await session.call_tool("write_file", {"path": "notes/a.txt", "content": "hello\n"})
    assert not r.isError, text(r)
    r = await session.call_tool("read_file", {"path": "notes/a.txt"})
    assert text(r) == "hello\n"
    r = await session.call_tool("list_files", {"path": "notes"})
    assert "/home/user/notes/a.txt" in text(r)
    r = await session.call_tool("run_command", {"command": "cat notes/a.txt; exit 4"})
    assert "hello" in text(r) and "exit code: 4" in text(r)

    # Errors are tool results the model can read, not protocol failures.
    r = await session.call_tool("read_file", {"path": "/no/such/file"})
    assert r.isError and "no such file" in text(r).lower()
    r = await session.call_tool("run_code", {"code": "1", "language": "cobol"})
    assert r.isError and "cobol" in text(r)
    r = await session.call_tool("write_file", {"path": "x"})
    assert r.isError and "content is required" in text(r)
    # A call runs 240 s at most: within the session's idle time and the client's wait.
    r = await session.call_tool("run_command", {"command": "true", "timeout_secs": 241})
    assert r.isError and "1 to 240" in text(r)
    # A command past its time is an error, as code past its time is.
    r = await session.call_tool("run_command", {"command": "sleep 30", "timeout_secs": 1})
    assert r.isError and "timed out" in text(r)

    r = await session.call_tool("list_sandboxes", {})
    assert "this session's" in text(r)


@pytest.mark.asyncio
async def test_over_http_and_the_session_s_sandbox_goes_with_it():
    before = set(running_mcp_sandboxes())
    async with streamablehttp_client(f"{URL}/mcp", headers={"Authorization": f"Bearer {KEY}"}) as (r, w, _):
        async with ClientSession(r, w) as session:
            await exercise(session)
            mine = set(running_mcp_sandboxes()) - before
            assert len(mine) == 1
    assert gone_soon(mine), "the session's sandbox outlived it"


def readme_mcp_config():
    """The `mcpServers` entry the README shows for desktop clients."""
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r'```json\n(\{"mcpServers".*?)```', text, re.S)
    assert block, "the README shows no mcpServers configuration"
    return json.loads(block.group(1))["mcpServers"]["moat"]


@pytest.mark.asyncio
async def test_over_stdio_through_moat_mcp():
    # The README's configuration, with this build's binary and this server's URL and key.
    config = readme_mcp_config()
    assert config["command"] == "moat" and set(config["env"]) == {"MOAT_URL", "MOAT_API_KEY"}
    before = set(running_mcp_sandboxes())
    params = StdioServerParameters(
        command=os.environ["MOAT_BIN"],
        args=config["args"],
        env={"MOAT_URL": URL, "MOAT_API_KEY": KEY},
    )
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as session:
            await exercise(session)
            mine = set(running_mcp_sandboxes()) - before
            assert len(mine) == 1
    assert gone_soon(mine), "the session's sandbox outlived it"


@pytest.mark.asyncio
async def test_two_sessions_have_their_own_sandboxes():
    headers = {"Authorization": f"Bearer {KEY}"}
    async with streamablehttp_client(f"{URL}/mcp", headers=headers) as (r1, w1, _):
        async with ClientSession(r1, w1) as one:
            await one.initialize()
            async with streamablehttp_client(f"{URL}/mcp", headers=headers) as (r2, w2, _):
                async with ClientSession(r2, w2) as two:
                    await two.initialize()
                    await one.call_tool("write_file", {"path": "mine.txt", "content": "one"})
                    r = await two.call_tool("read_file", {"path": "mine.txt"})
                    assert r.isError, text(r)
                    # A new sandbox on request: the session's tools move to it.
                    r = await two.call_tool("create_sandbox", {})
                    assert "created sandbox" in text(r)
                    r = await two.call_tool("kill_sandbox", {})
                    assert "destroyed" in text(r)


def api(method, path, body=None):
    req = urllib.request.Request(
        f"{URL}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


@pytest.mark.asyncio
async def test_naming_a_sandbox_never_shortens_its_life():
    made = api("POST", "/v1/sandboxes", {"timeout_secs": 3600})
    try:
        async with streamablehttp_client(f"{URL}/mcp", headers={"Authorization": f"Bearer {KEY}"}) as (r, w, _):
            async with ClientSession(r, w) as session:
                await session.initialize()
                done = await session.call_tool("run_command", {"command": "echo named", "sandbox_id": made["id"]})
                assert not done.isError and "named" in text(done)
        after = api("GET", f"/v1/sandboxes/{made['id']}")
        assert after["expires_at"] == made["expires_at"], (made, after)
    finally:
        api("DELETE", f"/v1/sandboxes/{made['id']}")


@pytest.mark.asyncio
async def test_a_request_without_a_key_is_refused():
    with pytest.raises(Exception):
        async with streamablehttp_client(f"{URL}/mcp") as (r, w, _):
            async with ClientSession(r, w) as session:
                await session.initialize()


def test_the_example_configurations_name_moat():
    examples = pathlib.Path(__file__).resolve().parents[2] / "examples/mcp"
    files = sorted(examples.glob("*.json"))
    assert len(files) >= 4, files
    for path in files:
        config = json.loads(path.read_text())
        (entry,) = (config.get("mcpServers") or config["servers"]).values()
        if "url" in entry:
            assert entry["url"].endswith("/mcp") and entry["headers"]["Authorization"].startswith("Bearer "), path
        else:
            assert (entry["command"], entry["args"]) == ("moat", ["mcp"]), path
            assert set(entry["env"]) == {"MOAT_URL", "MOAT_API_KEY"}, path
