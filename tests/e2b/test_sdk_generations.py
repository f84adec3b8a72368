"""What every 2.x generation of the `e2b` SDK does most, written against the calls they share.

`crates/moat/tests/e2b_sdk.rs` runs this file with the newest SDK (target/test-venv) and with
older ones (target/test-venv-e2b-<version>, made by scripts/test-deps.sh): e2b 2.7.0 (the
oldest 2.x that reads `E2B_SANDBOX_URL`) to 2.50 create with `POST /sandboxes` and connect with
`POST /sandboxes/{id}/connect`; 2.51 and later use `/v2/sandboxes`.
"""

import e2b
import httpx
import pytest
from e2b import Sandbox, SandboxQuery


def version():
    from importlib.metadata import version as installed

    return installed("e2b")


@pytest.fixture
def sbx(tag):
    sandbox = Sandbox.create(metadata={"tag": tag}, timeout=120)
    yield sandbox
    Sandbox.kill(sandbox.sandbox_id)


def test_create_command_and_files(sbx):
    print("e2b", version())
    result = sbx.commands.run("echo hello from $(whoami)")
    assert result.exit_code == 0
    assert result.stdout == "hello from user\n"
    sbx.files.write("/home/user/gen.txt", "generations")
    assert sbx.files.read("/home/user/gen.txt") == "generations"
    names = [entry.name for entry in sbx.files.list("/home/user")]
    assert "gen.txt" in names
    assert sbx.is_running()


def test_list_and_info(sbx, tag):
    listed = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
    assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata == {"tag": tag}


def test_first_listing_route(sbx, tag, moat):
    # E2B's first listing (no SDK 2.x calls it any more): running sandboxes, in one answer.
    r = httpx.get(
        moat.api_url + "/sandboxes",
        params={"metadata": f"tag={tag}"},
        headers={"X-API-KEY": moat.api_key},
    )
    assert r.status_code == 200, r.text
    assert [s["sandboxID"] for s in r.json()] == [sbx.sandbox_id]
    assert r.json()[0]["state"] == "running"


def test_connect_to_running_and_paused(sbx):
    sbx.files.write("/home/user/kept.txt", "kept")
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.files.read("/home/user/kept.txt") == "kept"
    # A paused sandbox is resumed by a connect, in each generation's own way.
    sbx.beta_pause()
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=60)
    assert resumed.commands.run("cat /home/user/kept.txt").stdout == "kept"


def test_kill(tag):
    sandbox = Sandbox.create(metadata={"tag": tag})
    assert Sandbox.kill(sandbox.sandbox_id) is True
    assert not sandbox.is_running()
    assert Sandbox.kill(sandbox.sandbox_id) is False
    with pytest.raises(e2b.SandboxException):
        Sandbox.connect(sandbox.sandbox_id)
