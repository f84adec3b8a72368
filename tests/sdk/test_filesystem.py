"""A sandbox's files through the SDK: reads and writes, listings, moves, directories up and
down as tar with progress, refusals, and archives that try to escape, sync and async."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

import moat


def test_write_read_stat_list(sandbox: moat.Sandbox) -> None:
    files = sandbox.files
    entry = files.write("notes/a.txt", "héllo")
    assert (
        entry.path == "/home/user/notes/a.txt"
        and entry.is_file
        and entry.size == len("héllo".encode())
    )
    assert entry.owner == "user" and entry.mode == 0o644
    assert files.read("notes/a.txt") == "héllo".encode()
    assert files.read_text("/home/user/notes/a.txt") == "héllo"
    assert files.read_text("~/notes/a.txt") == "héllo"

    files.write("notes/b.bin", bytes(range(256)))
    files.write("notes/c.txt", io.BytesIO(b"from a file object"))
    files.write("notes/d.txt", iter([b"chunk one, ", b"chunk two"]))
    assert files.read("notes/b.bin") == bytes(range(256))
    assert files.read_text("notes/c.txt") == "from a file object"
    assert files.read_text("notes/d.txt") == "chunk one, chunk two"
    files.write("notes/a.txt", "")  # replaced, empty
    assert files.read("notes/a.txt") == b""

    st = files.stat("notes")
    assert st.is_dir and st.name == "notes" and st.modified_at.year >= 2024
    names = [e.name for e in files.list("notes")]
    assert names == ["a.txt", "b.bin", "c.txt", "d.txt"]
    files.make_dir("notes/deep/er")
    deep = [e.path for e in files.list("notes", depth=3)]
    assert "/home/user/notes/deep/er" in deep
    assert [e.name for e in files.list("notes", depth=1)] == [
        "a.txt",
        "b.bin",
        "c.txt",
        "d.txt",
        "deep",
    ]
    assert files.exists("notes/b.bin") and not files.exists("notes/zzz")

    sandbox.exec("ln -s notes/b.bin link")
    link = files.stat("link")
    assert link.is_symlink and link.symlink_target == "/home/user/notes/b.bin"


def test_mkdir_rename_remove(sandbox: moat.Sandbox) -> None:
    files = sandbox.files
    made = files.make_dir("x/y/z")
    assert made.is_dir and made.path == "/home/user/x/y/z"
    assert files.make_dir("x/y/z").is_dir  # already there: fine
    files.write("x/file", "f")
    with pytest.raises(moat.ConflictError) as err:
        files.make_dir("x/file")
    assert err.value.code == "not_a_directory"

    moved = files.rename("x/file", "elsewhere/renamed")
    assert moved.path == "/home/user/elsewhere/renamed" and not files.exists("x/file")
    assert files.move("elsewhere/renamed", "x/back").name == "back"

    files.remove("x")
    assert not files.exists("x")
    with pytest.raises(moat.NotFoundError):
        files.remove("x")


def test_refusals(sandbox: moat.Sandbox) -> None:
    files = sandbox.files
    files.make_dir("adir")
    with pytest.raises(moat.NotFoundError) as nf:
        files.read("missing.txt")
    assert nf.value.status == 404 and nf.value.code == "not_found"
    with pytest.raises(moat.ConflictError) as isdir:
        files.read("adir")
    assert isdir.value.code == "is_a_directory"
    with pytest.raises(moat.ConflictError):
        files.write("adir", "x")
    with pytest.raises(moat.PermissionDeniedError) as denied:
        files.write("/root/secret", "x")
    assert denied.value.status == 403 and denied.value.code == "forbidden"
    # As root it is allowed.
    assert files.write("/root/secret", "x", user="root").owner == "root"
    assert files.read_text("/root/secret", user="root") == "x"
    with pytest.raises(ValueError, match="user"):
        files.read("/etc/hostname", user="nobody")
    with pytest.raises(ValueError, match="path"):
        files.read("")
    with pytest.raises(TypeError):
        files.write("x", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        files.list("~", depth=0)
    # A name with a plus and spaces is one name, not a query.
    files.write("a+b c&d=e.txt", "odd")
    assert [e.name for e in files.list("~") if e.name.startswith("a+")] == ["a+b c&d=e.txt"]


def _tree(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


def _make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper" / "ünïcode name.txt").write_text("u")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho ran\n")
    run.chmod(0o755)
    (root / "link").symlink_to("a.txt")


def test_directories_up_and_down(sandbox: moat.Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    progress: list[tuple[int, int | None]] = []
    entry = sandbox.files.upload_dir(
        src, "project", on_progress=lambda d, t: progress.append((d, t))
    )
    assert entry.is_dir and entry.path == "/home/user/project"
    total = progress[-1][1]
    assert progress[0] == (0, total) and total is not None and progress[-1][0] == total
    assert sandbox.exec("./run.sh", cwd="/home/user/project").stdout == "ran\n"
    assert sandbox.files.read_text("project/link") == "alpha"
    # Uploading again adds to the directory.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "more.txt").write_text("more")
    sandbox.files.upload_dir(extra, "project")
    assert sandbox.files.exists("project/more.txt") and sandbox.files.exists("project/a.txt")

    down = tmp_path / "down"
    seen: list[int] = []
    got = sandbox.files.download_dir("project", down, on_progress=lambda d, t: seen.append(d))
    assert got == down and seen[0] == 0 and seen[-1] > 300_000
    expected = _tree(src)
    expected["more.txt"] = (b"more", 0o644)
    assert _tree(down) == expected

    with pytest.raises(moat.ConflictError):
        sandbox.files.download_dir("project/a.txt", tmp_path / "nope")
    with pytest.raises(moat.NotFoundError):
        sandbox.files.download_dir("no-such-dir", tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        sandbox.files.upload_dir(src / "a.txt", "x")


def test_files_up_and_down_with_progress(sandbox: moat.Sandbox, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    ups: list[tuple[int, int | None]] = []
    entry = sandbox.files.upload_file(
        local, "/tmp/big.bin", on_progress=lambda d, t: ups.append((d, t))
    )
    assert entry.size == len(data)
    assert ups[0] == (0, len(data)) and ups[-1] == (len(data), len(data)) and len(ups) > 2
    downs: list[tuple[int, int | None]] = []
    out = sandbox.files.download_file(
        "/tmp/big.bin", tmp_path / "copy.bin", on_progress=lambda d, t: downs.append((d, t))
    )
    assert out.read_bytes() == data
    assert downs[-1] == (len(data), len(data))
    with pytest.raises(moat.NotFoundError):
        sandbox.files.download_file("/tmp/none", tmp_path / "none.bin")
    # Nothing is left behind by a failed download.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "copy.bin"]


@pytest.mark.parametrize(
    "setup",
    [
        "ln -s /etc evil",  # an absolute link
        "ln -s ../../.. up",  # a relative link out
        "mkdir d && ln -s /tmp d/out && touch /tmp/x",
    ],
)
def test_archives_that_escape_are_refused(
    sandbox: moat.Sandbox, tmp_path: Path, setup: str
) -> None:
    sandbox.exec(f"mkdir -p ~/bad && cd ~/bad && echo fine > ok.txt && {setup}").check()
    target = tmp_path / "target"
    with pytest.raises(moat.MoatError) as err:
        sandbox.files.download_dir("bad", target)
    assert err.value.code == "unsafe_archive"
    # Nothing was written outside the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


@pytest.mark.asyncio
async def test_async_files(asandbox: moat.AsyncSandbox, tmp_path: Path) -> None:
    files = asandbox.files
    assert (await files.write("a/b.txt", "async", on_progress=lambda d, t: None)).size == 5
    assert await files.read("a/b.txt") == b"async"
    assert await files.read_text("a/b.txt") == "async"
    assert (await files.stat("a")).is_dir
    assert [e.name for e in await files.list("a")] == ["b.txt"]
    assert await files.exists("a/b.txt") and not await files.exists("a/c.txt")
    assert (await files.make_dir("a/sub")).is_dir
    assert (await files.rename("a/b.txt", "a/sub/c.txt")).path == "/home/user/a/sub/c.txt"
    assert (await files.move("a/sub/c.txt", "a/d.txt")).name == "d.txt"
    await files.remove("a/sub")
    assert not await files.exists("a/sub")

    src = tmp_path / "src"
    _make_tree(src)
    seen: list[int] = []

    async def progress(done: int, total: int | None) -> None:
        seen.append(done)

    await files.upload_dir(src, "proj", on_progress=progress)
    assert seen[0] == 0 and seen[-1] > 300_000
    await files.download_dir("proj", tmp_path / "down", on_progress=progress)
    assert _tree(tmp_path / "down") == _tree(src)

    local = tmp_path / "one.txt"
    local.write_text("one")
    await files.upload_file(local, "one.txt")
    assert (await files.download_file("one.txt", tmp_path / "back.txt")).read_text() == "one"
    with pytest.raises(moat.NotFoundError):
        await files.read("nothing")
    with pytest.raises(moat.ConflictError):
        await files.read("proj")
