"""A sandbox's filesystem: ``sandbox.files``.

Paths in the sandbox are absolute, or relative to the sandbox user's home (``~`` too). Every
call acts as the sandbox's user, or as ``root`` with ``user="root"``. Transfers stream both
ways; directories travel as tar archives, which the sandbox's own ``tar`` packs and unpacks.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import io
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from . import _args, _tar
from ._http import AsyncTransport, Op, SyncTransport, parse_json, parse_none, seg
from .errors import MoatError, NotFoundError
from .models import FileEntry

__all__ = ["AsyncFiles", "Files", "ProgressCallback"]

#: Called as ``on_progress(done, total)`` with the bytes moved so far and the total when
#: known (``None`` otherwise); an async client's may be a coroutine function.
ProgressCallback = Callable[[int, "int | None"], Any]

#: What :meth:`Files.write` takes: bytes, text (written as UTF-8), a binary file object, or an
#: iterable of byte chunks.
WriteData = bytes | bytearray | memoryview | str | IO[bytes] | Iterable[bytes]

_CHUNK = 1 << 20


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"a sandbox path must be a non-empty string, not {path!r}")
    if "\0" in path:
        raise ValueError("a sandbox path must not contain NUL")
    return path


def _user_params(user: str | None) -> list[tuple[str, str]]:
    return [("user", user)] if _args.user(user) is not None and user is not None else []


def _params(path: str, user: str | None, **extra: str) -> list[tuple[str, str]]:
    return [("path", _check_path(path)), *extra.items(), *_user_params(user)]


def _source(data: WriteData) -> tuple[Iterator[bytes], int | None]:
    """The bytes of ``data`` in chunks, and their number when it can be known up front."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        return (raw[i : i + _CHUNK] for i in range(0, max(len(raw), 1), _CHUNK)), len(raw)
    read = getattr(data, "read", None)
    if callable(read):
        f: Any = data
        total: int | None = None
        try:
            here = f.tell()
            total = os.fstat(f.fileno()).st_size - here
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            total = None

        def from_file() -> Iterator[bytes]:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    return
                if not isinstance(chunk, bytes):
                    raise TypeError("the file object must be opened in binary mode")
                yield chunk

        return from_file(), total
    if isinstance(data, Iterable):

        def checked() -> Iterator[bytes]:
            for chunk in data:
                if not isinstance(chunk, (bytes, bytearray, memoryview)):
                    raise TypeError("an iterable written to a file must yield bytes")
                yield bytes(chunk)

        return checked(), None
    raise TypeError(
        f"cannot write {type(data).__name__}: "
        "give bytes, str, a binary file or an iterable of bytes"
    )


def _with_progress(
    chunks: Iterator[bytes], total: int | None, cb: ProgressCallback | None
) -> Iterator[bytes]:
    done = 0
    if cb is not None:
        cb(0, total)
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        if cb is not None:
            cb(done, total)


async def _awith_progress(
    chunks: Iterator[bytes], total: int | None, cb: ProgressCallback | None
) -> AsyncIterator[bytes]:
    done = 0
    await _acall(cb, 0, total)
    # Each chunk is read from a local file (or a directory archived as it goes) on a
    # thread: the event loop's other tasks go on meanwhile.
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk
        done += len(chunk)
        await _acall(cb, done, total)


async def _acall(cb: ProgressCallback | None, done: int, total: int | None) -> None:
    if cb is not None:
        out = cb(done, total)
        if inspect.isawaitable(out):
            await out


def _length_headers(total: int | None) -> dict[str, str]:
    # A known length lets the server refuse an oversized upload before it starts.
    return {"Content-Type": "application/octet-stream"} | (
        {"Content-Length": str(total)} if total is not None else {}
    )


def _total(r: httpx.Response) -> int | None:
    value = r.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _local_tmp(local: Path) -> Path:
    return local.with_name(f".{local.name}.moat-partial")


class Files:
    """The files of one sandbox (``sandbox.files``)."""

    def __init__(self, transport: SyncTransport, sandbox_id: str) -> None:
        self._t = transport
        self._base = f"/v1/sandboxes/{seg(sandbox_id)}/files"

    def read(self, path: str, *, user: str | None = None) -> bytes:
        """The bytes of the file at ``path``."""
        return self._t.call(Op("GET", self._base, lambda r: r.content, params=_params(path, user)))

    def read_text(self, path: str, *, encoding: str = "utf-8", user: str | None = None) -> str:
        """The file at ``path`` as text."""
        return self.read(path, user=user).decode(encoding)

    def write(
        self,
        path: str,
        data: WriteData,
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> FileEntry:
        """Writes ``data`` to the file at ``path``, replacing it, making missing parents."""
        params = _params(path, user)
        chunks, total = _source(data)
        return self._t.call(
            Op(
                "PUT",
                self._base,
                parse_json(FileEntry.from_json),
                params=params,
                content=_with_progress(chunks, total, on_progress),
                headers=_length_headers(total),
            )
        )

    def list(
        self, path: str = "~", *, depth: int = 1, user: str | None = None
    ) -> builtins.list[FileEntry]:
        """The entries of the directory ``path``, down to ``depth`` levels (1 to 32),
        depth-first with names in byte order."""
        _args.count("depth", depth, maximum=32)
        return self._t.call(
            Op(
                "GET",
                self._base + "/list",
                parse_json(lambda j: [FileEntry.from_json(e) for e in j["entries"]]),
                params=_params(path, user, depth=str(depth)),
            )
        )

    def stat(self, path: str, *, user: str | None = None) -> FileEntry:
        """What is at ``path``; :class:`~moat.errors.NotFoundError` when nothing is."""
        return self._t.call(
            Op(
                "GET",
                self._base + "/stat",
                parse_json(FileEntry.from_json),
                params=_params(path, user),
            )
        )

    def exists(self, path: str, *, user: str | None = None) -> bool:
        """Whether something is at ``path``."""
        try:
            self.stat(path, user=user)
        except NotFoundError:
            return False
        return True

    def remove(self, path: str, *, user: str | None = None) -> None:
        """Removes the file, or the directory with everything in it, at ``path`` (a symbolic
        link itself, not its target)."""
        self._t.call(Op("DELETE", self._base, parse_none, params=_params(path, user), ok=(204,)))

    def make_dir(self, path: str, *, user: str | None = None) -> FileEntry:
        """Makes the directory ``path`` and its missing parents (nothing when it exists)."""
        q = _user_params(user)
        _check_path(path)
        return self._t.call(
            Op(
                "POST",
                self._base + "/mkdir",
                parse_json(FileEntry.from_json),
                params=q,
                json={"path": path},
                ok=(200, 201),
            )
        )

    def rename(self, source: str, destination: str, *, user: str | None = None) -> FileEntry:
        """Moves ``source`` to ``destination`` (its parents are made; a file there is
        replaced); the entry at its new path."""
        q = _user_params(user)
        _check_path(source)
        _check_path(destination)
        return self._t.call(
            Op(
                "POST",
                self._base + "/move",
                parse_json(FileEntry.from_json),
                params=q,
                json={"from": source, "to": destination},
            )
        )

    #: Another name of :meth:`rename`.
    move = rename

    def upload_file(
        self,
        local_path: str | os.PathLike[str],
        path: str,
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> FileEntry:
        """Copies the local file ``local_path`` to ``path`` in the sandbox."""
        with open(local_path, "rb") as f:
            return self.write(path, f, user=user, on_progress=on_progress)

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        path: str,
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> FileEntry:
        """Copies the contents of the local directory ``local_dir`` into the directory
        ``path`` (made if missing, added to if present); the directory's entry."""
        source = _tar.TarSource(local_dir)
        return self._t.call(
            Op(
                "PUT",
                self._base,
                parse_json(FileEntry.from_json),
                params=_params(path, user, format="tar"),
                content=_with_progress(source.chunks(), source.size, on_progress),
                headers=_length_headers(source.size) | {"Content-Type": "application/x-tar"},
            )
        )

    def download_file(
        self,
        path: str,
        local_path: str | os.PathLike[str],
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Copies the file ``path`` to ``local_path`` (written beside it, then renamed into
        place when complete)."""
        local = Path(local_path)
        tmp = _local_tmp(local)
        try:
            with (
                self._t.stream("GET", self._base, params=_params(path, user)) as r,
                open(tmp, "wb") as out,
            ):
                total, done = _total(r), 0
                if on_progress is not None:
                    on_progress(0, total)
                for chunk in r.iter_bytes(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, total)
                if total is not None and done != total:
                    raise MoatError(f"the download of {path} stopped short", code="incomplete")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def download_dir(
        self,
        path: str,
        local_dir: str | os.PathLike[str],
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Copies the contents of the directory ``path`` into ``local_dir`` (made if
        missing). What comes out of a sandbox is untrusted: entries that would land outside
        ``local_dir`` stop the copy with an error, set-id bits and owners are dropped."""
        with tempfile.TemporaryFile() as spool:
            with self._t.stream("GET", self._base, params=_params(path, user, format="tar")) as r:
                done = 0
                if on_progress is not None:
                    on_progress(0, None)
                for chunk in r.iter_bytes(_CHUNK):
                    spool.write(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, None)
            spool.seek(0)
            _tar.extract(spool, local_dir)
        return Path(local_dir)


class AsyncFiles:
    """The files of one sandbox (``sandbox.files`` of an :class:`~moat.AsyncSandbox`)."""

    def __init__(self, transport: AsyncTransport, sandbox_id: str) -> None:
        self._t = transport
        self._base = f"/v1/sandboxes/{seg(sandbox_id)}/files"

    async def read(self, path: str, *, user: str | None = None) -> bytes:
        """The bytes of the file at ``path``."""
        return await self._t.call(
            Op("GET", self._base, lambda r: r.content, params=_params(path, user))
        )

    async def read_text(
        self, path: str, *, encoding: str = "utf-8", user: str | None = None
    ) -> str:
        """The file at ``path`` as text."""
        return (await self.read(path, user=user)).decode(encoding)

    async def write(
        self,
        path: str,
        data: WriteData,
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> FileEntry:
        """Writes ``data`` to the file at ``path``, replacing it, making missing parents."""
        params = _params(path, user)
        chunks, total = _source(data)
        return await self._t.call(
            Op(
                "PUT",
                self._base,
                parse_json(FileEntry.from_json),
                params=params,
                content=_awith_progress(chunks, total, on_progress),
                headers=_length_headers(total),
            )
        )

    async def list(
        self, path: str = "~", *, depth: int = 1, user: str | None = None
    ) -> builtins.list[FileEntry]:
        """The entries of the directory ``path``, down to ``depth`` levels (1 to 32)."""
        _args.count("depth", depth, maximum=32)
        return await self._t.call(
            Op(
                "GET",
                self._base + "/list",
                parse_json(lambda j: [FileEntry.from_json(e) for e in j["entries"]]),
                params=_params(path, user, depth=str(depth)),
            )
        )

    async def stat(self, path: str, *, user: str | None = None) -> FileEntry:
        """What is at ``path``; :class:`~moat.errors.NotFoundError` when nothing is."""
        return await self._t.call(
            Op(
                "GET",
                self._base + "/stat",
                parse_json(FileEntry.from_json),
                params=_params(path, user),
            )
        )

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        """Whether something is at ``path``."""
        try:
            await self.stat(path, user=user)
        except NotFoundError:
            return False
        return True

    async def remove(self, path: str, *, user: str | None = None) -> None:
        """Removes the file, or the directory with everything in it, at ``path``."""
        await self._t.call(
            Op("DELETE", self._base, parse_none, params=_params(path, user), ok=(204,))
        )

    async def make_dir(self, path: str, *, user: str | None = None) -> FileEntry:
        """Makes the directory ``path`` and its missing parents (nothing when it exists)."""
        q = _user_params(user)
        _check_path(path)
        return await self._t.call(
            Op(
                "POST",
                self._base + "/mkdir",
                parse_json(FileEntry.from_json),
                params=q,
                json={"path": path},
                ok=(200, 201),
            )
        )

    async def rename(self, source: str, destination: str, *, user: str | None = None) -> FileEntry:
        """Moves ``source`` to ``destination``; the entry at its new path."""
        q = _user_params(user)
        _check_path(source)
        _check_path(destination)
        return await self._t.call(
            Op(
                "POST",
                self._base + "/move",
                parse_json(FileEntry.from_json),
                params=q,
                json={"from": source, "to": destination},
            )
        )

    #: Another name of :meth:`rename`.
    move = rename

    async def upload_file(
        self,
        local_path: str | os.PathLike[str],
        path: str,
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> FileEntry:
        """Copies the local file ``local_path`` to ``path`` in the sandbox."""
        with open(local_path, "rb") as f:
            return await self.write(path, f, user=user, on_progress=on_progress)

    async def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        path: str,
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> FileEntry:
        """Copies the contents of the local directory ``local_dir`` into the directory
        ``path`` (made if missing, added to if present); the directory's entry."""
        source = await asyncio.to_thread(_tar.TarSource, local_dir)
        return await self._t.call(
            Op(
                "PUT",
                self._base,
                parse_json(FileEntry.from_json),
                params=_params(path, user, format="tar"),
                content=_awith_progress(source.chunks(), source.size, on_progress),
                headers=_length_headers(source.size) | {"Content-Type": "application/x-tar"},
            )
        )

    async def download_file(
        self,
        path: str,
        local_path: str | os.PathLike[str],
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Copies the file ``path`` to ``local_path`` (written beside it, then renamed)."""
        local = Path(local_path)
        tmp = _local_tmp(local)
        try:
            async with self._t.stream("GET", self._base, params=_params(path, user)) as r:
                with open(tmp, "wb") as out:
                    total, done = _total(r), 0
                    await _acall(on_progress, 0, total)
                    async for chunk in r.aiter_bytes(_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
                        done += len(chunk)
                        await _acall(on_progress, done, total)
                    if total is not None and done != total:
                        raise MoatError(f"the download of {path} stopped short", code="incomplete")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    async def download_dir(
        self,
        path: str,
        local_dir: str | os.PathLike[str],
        *,
        user: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Copies the contents of the directory ``path`` into ``local_dir`` (made if
        missing), refusing entries that would land outside it."""
        with tempfile.TemporaryFile() as spool:
            async with self._t.stream(
                "GET", self._base, params=_params(path, user, format="tar")
            ) as r:
                done = 0
                await _acall(on_progress, 0, None)
                async for chunk in r.aiter_bytes(_CHUNK):
                    spool.write(chunk)
                    done += len(chunk)
                    await _acall(on_progress, done, None)
            spool.seek(0)
            await asyncio.to_thread(_tar.extract, spool, local_dir)
        return Path(local_dir)
