"""Tar archives of local directories (streamed, never held whole in memory) and the safe
unpacking of archives that come out of a sandbox, whose contents are untrusted."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import MoatError

_BLOCK = 512
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Entry:
    name: str
    path: Path
    info: tarfile.TarInfo
    header: bytes


def _entry(name: str, path: Path, st: os.stat_result) -> _Entry | None:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    # Owners are the sandbox user's on arrival; the host's ids mean nothing there.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
    else:
        # Sockets, FIFOs and devices do not travel.
        return None
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return _Entry(name, path, info, header)


class TarSource:
    """A directory as a tar archive, produced piece by piece.

    Entries are in name order (so the same tree gives the same bytes), with permission bits
    and modification times, owners left out, symbolic links as links; other special files are
    skipped. ``exclude`` (given a path relative to the root, with ``/``) leaves entries out.
    """

    def __init__(
        self, root: str | os.PathLike[str], exclude: Callable[[str, bool], bool] | None = None
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a directory")
        self._entries: list[_Entry] = []
        self._walk(self.root, "", exclude)
        self.size = sum(len(e.header) + _padded(e.info.size) for e in self._entries) + 2 * _BLOCK

    def _walk(
        self, directory: Path, prefix: str, exclude: Callable[[str, bool], bool] | None
    ) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise MoatError(f"cannot read {directory}: {e.strerror}", code="local_io") from e
        for name in names:
            path = directory / name
            rel = prefix + name
            st = path.lstat()
            is_dir = stat.S_ISDIR(st.st_mode)
            if exclude is not None and exclude(rel, is_dir):
                continue
            entry = _entry(rel, path, st)
            if entry is None:
                continue
            self._entries.append(entry)
            if is_dir:
                self._walk(path, rel + "/", exclude)

    def chunks(self) -> Iterator[bytes]:
        """The archive's bytes; a file that changed size meanwhile stops it with an error."""
        for e in self._entries:
            yield e.header
            if e.info.type != tarfile.REGTYPE:
                continue
            left = e.info.size
            with open(e.path, "rb") as f:
                while left > 0:
                    data = f.read(min(_CHUNK, left))
                    if not data:
                        break
                    left -= len(data)
                    yield data
                if left or f.read(1):
                    raise MoatError(
                        f"{e.path} changed size while it was being sent", code="local_io"
                    )
            pad = _padded(e.info.size) - e.info.size
            if pad:
                yield b"\0" * pad
        yield b"\0" * (2 * _BLOCK)


def _padded(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK * _BLOCK


def _unsafe(msg: str) -> MoatError:
    return MoatError(f"refusing the sandbox's archive: {msg}", code="unsafe_archive")


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def extract(fileobj: IO[bytes], dest: str | os.PathLike[str]) -> None:
    """Unpacks the tar stream ``fileobj`` into ``dest`` (made if missing).

    Entries that would land outside ``dest`` (absolute names, ``..``, through a symbolic
    link, links pointing out) stop the unpacking with an error; set-id bits and owners are
    dropped; devices, FIFOs and other special entries are skipped.
    """
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    dirs: list[tuple[str, int, float]] = []
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for m in tar:
            name = m.name
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or ".." in parts:
                raise _unsafe(f"the entry {name!r} points outside its directory")
            if not parts:
                if m.isdir():
                    dirs.append((root, m.mode, m.mtime))
                continue
            target = os.path.join(root, *parts)
            parent = os.path.dirname(target)
            _make_dirs(root, parent)
            if not _inside(root, os.path.realpath(parent)):
                raise _unsafe(f"the entry {name!r} goes through a link out of its directory")
            mode = m.mode & 0o777
            if m.isdir():
                if os.path.islink(target):
                    raise _unsafe(f"the directory {name!r} replaces a link")
                os.makedirs(target, exist_ok=True)
                dirs.append((target, mode, m.mtime))
            elif m.isreg():
                src = tar.extractfile(m)
                if src is None:
                    continue
                _replace(target)
                fd = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode | 0o600
                )
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                os.chmod(target, mode)
                os.utime(target, (m.mtime, m.mtime))
            elif m.issym():
                link = m.linkname
                resolved = os.path.normpath(os.path.join(parent, link))
                if os.path.isabs(link) or not _inside(root, resolved):
                    raise _unsafe(f"the link {name!r} points outside its directory ({link!r})")
                _replace(target)
                os.symlink(link, target)
            elif m.islnk():
                lparts = [p for p in m.linkname.split("/") if p not in ("", ".")]
                source = os.path.join(root, *lparts)
                if ".." in lparts or not _inside(root, os.path.realpath(source)):
                    raise _unsafe(f"the hard link {name!r} points outside its directory")
                _replace(target)
                shutil.copy2(source, target, follow_symlinks=False)
            # Anything else (devices, FIFOs) is skipped.
    # Directories last, deepest first, so their own modes do not stop their contents.
    for path, mode, mtime in reversed(dirs):
        os.chmod(path, mode | 0o700)
        os.utime(path, (mtime, mtime))


def _make_dirs(root: str, path: str) -> None:
    if os.path.isdir(path):
        return
    rel = os.path.relpath(path, root)
    cur = root
    for part in rel.split(os.sep):
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            if not _inside(root, os.path.realpath(cur)):
                raise _unsafe(f"{rel!r} goes through a link out of its directory")
        elif not os.path.isdir(cur):
            os.mkdir(cur, 0o755)


def _replace(target: str) -> None:
    """Clears the way for a new entry at ``target`` (a file or link; never a directory)."""
    if os.path.islink(target) or os.path.isfile(target):
        os.unlink(target)
    elif os.path.isdir(target):
        raise _unsafe(f"{target!r} is a directory in the way of a file")


# --- .dockerignore --------------------------------------------------------------------------


class DockerIgnore:
    """The patterns of a ``.dockerignore`` file, matched as Docker matches them: each line a
    pattern relative to the context's root (``*``, ``?``, ``[...]`` within a name, ``**`` for
    any number of directories), later lines winning, ``!`` re-including. A directory that is
    excluded is left out whole unless a ``!`` pattern names something inside it."""

    def __init__(self, text: str) -> None:
        self._rules: list[tuple[re.Pattern[str], bool]] = []
        self._has_negation = False
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
                self._has_negation = True
            line = os.path.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            self._rules.append((_compile(line), negate))

    @classmethod
    def of(cls, root: str | os.PathLike[str]) -> DockerIgnore | None:
        """The root's ``.dockerignore``, if it has one."""
        path = Path(root) / ".dockerignore"
        if not path.is_file():
            return None
        return cls(path.read_text(encoding="utf-8", errors="replace"))

    def excluded(self, rel: str, is_dir: bool) -> bool:
        """Whether the entry at ``rel`` (``/``-separated) is left out."""
        out = False
        for pattern, negate in self._rules:
            if pattern.fullmatch(rel) or _parent_matches(pattern, rel):
                out = not negate
        # A directory left out may still hold something a later "!" brings back.
        if out and is_dir and self._has_negation:
            return False
        return out


def _parent_matches(pattern: re.Pattern[str], rel: str) -> bool:
    parts = rel.split("/")
    return any(pattern.fullmatch("/".join(parts[:i])) for i in range(1, len(parts)))


def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!") or body.startswith("^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))
