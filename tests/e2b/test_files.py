"""Files through the unmodified `e2b` SDK (sync and async) against moat serve."""

import asyncio
import time

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FileType,
    FilesystemEventType,
    Sandbox,
)


@pytest.fixture
def sbx():
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


def test_write_read_text_and_bytes(sbx):
    info = sbx.files.write("/home/user/notes/a.txt", "hello")
    assert info.path == "/home/user/notes/a.txt"
    assert sbx.files.read("/home/user/notes/a.txt") == "hello"
    sbx.files.write("/home/user/b.bin", b"\x00\x01\xff")
    assert sbx.files.read("/home/user/b.bin", format="bytes") == b"\x00\x01\xff"
    streamed = b"".join(sbx.files.read("/home/user/b.bin", format="stream"))
    assert streamed == b"\x00\x01\xff"
    # Relative paths are the user's home.
    assert sbx.files.read("notes/a.txt") == "hello"
    # Files written over the API belong to the user.
    assert sbx.commands.run("stat -c %U /home/user/notes/a.txt").stdout == "user\n"


def test_write_files_many_at_once(sbx):
    written = sbx.files.write_files(
        [
            {"path": "/tmp/many/one.txt", "data": "1"},
            {"path": "/tmp/many/two.txt", "data": b"2"},
        ]
    )
    assert sorted(w.path for w in written) == ["/tmp/many/one.txt", "/tmp/many/two.txt"]
    assert sbx.commands.run("cat /tmp/many/one.txt /tmp/many/two.txt").stdout == "12"


def test_list_exists_info_rename_remove_make_dir(sbx):
    assert sbx.files.make_dir("/home/user/d") is True
    assert sbx.files.make_dir("/home/user/d") is False
    sbx.files.write("/home/user/d/f.txt", "abc")
    entries = sbx.files.list("/home/user/d")
    assert [(e.name, e.type) for e in entries] == [("f.txt", FileType.FILE)]
    assert sbx.files.exists("/home/user/d/f.txt") is True
    assert sbx.files.exists("/home/user/d/missing") is False
    info = sbx.files.get_info("/home/user/d/f.txt")
    assert info.size == 3
    assert info.type == FileType.FILE
    assert info.owner == "user"
    moved = sbx.files.rename("/home/user/d/f.txt", "/home/user/d/g.txt")
    assert moved.path == "/home/user/d/g.txt"
    sbx.files.remove("/home/user/d")
    assert sbx.files.exists("/home/user/d") is False
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/home/user/d/g.txt")


def test_watch_dir_sync_polling(sbx):
    sbx.files.make_dir("/home/user/w")
    handle = sbx.files.watch_dir("/home/user/w")
    try:
        sbx.files.write("/home/user/w/new.txt", "x")
        events = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            e.name == "new.txt" for e in events
        ):
            events += handle.get_new_events()
            time.sleep(0.05)
        assert any(
            e.name == "new.txt" and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE)
            for e in events
        ), events
    finally:
        handle.stop()


def test_signed_upload_and_download_urls(sbx):
    up = sbx.upload_url("/home/user/signed.txt", use_signature_expiration=60)
    r = httpx.post(up, files={"file": ("signed.txt", b"via url")})
    assert r.status_code == 200, r.text
    down = sbx.download_url("/home/user/signed.txt")
    r = httpx.get(down)
    assert r.status_code == 200, r.text
    assert r.content == b"via url"
    # A signature for another path does not open this one.
    forged = down.replace("signed.txt", "other.txt")
    assert httpx.get(forged).status_code == 401


@pytest.mark.asyncio
async def test_async_files_and_streaming_watch():
    sandbox = await AsyncSandbox.create()
    try:
        await sandbox.files.make_dir("/home/user/aw")
        seen = asyncio.Queue()
        handle = await sandbox.files.watch_dir("/home/user/aw", on_event=seen.put_nowait)
        await sandbox.files.write("/home/user/aw/file.txt", "async")
        event = await asyncio.wait_for(seen.get(), timeout=10)
        assert event.name == "file.txt"
        await handle.stop()
        assert await sandbox.files.read("/home/user/aw/file.txt") == "async"
        entries = await sandbox.files.list("/home/user/aw")
        assert [e.name for e in entries] == ["file.txt"]
    finally:
        await sandbox.kill()
