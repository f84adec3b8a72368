"""What the executor and the environment share: paths, file contents and time limits."""

from __future__ import annotations

import base64
import binascii
import mimetypes
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from ...models import FileEntry

#: The longest a command or a code run may take: the server's cap on a command's timeout, and
#: the sandbox time to live a run with no timeout of its own is given.
MAX_RUN_SECONDS = 3600
#: How long a sandbox is kept past the end of a run's time limit, so the server never ends it
#: before the client has read the run's result and its files.
TTL_MARGIN = 60
#: The directory (under the sandbox user's home unless absolute) code and commands run in.
DEFAULT_WORKING_DIR = "workspace"
#: How deep below the working directory output files are looked for.
LIST_DEPTH = 8
#: Bounds on the output files of one result, past which files are left out (and logged): they
#: are held in memory whole and saved as artifacts, and a run may write a whole tree.
MAX_OUTPUT_FILE_BYTES = 16 * 1024 * 1024
MAX_OUTPUT_TOTAL_BYTES = 64 * 1024 * 1024
MAX_OUTPUT_FILES = 100
#: What a code run's printed output may hold, per stream, before the rest is dropped (and
#: said): it is kept in the agent's memory and handed to the model whole.
MAX_PRINTED_CHARS = 1024 * 1024


def check_working_dir(value: object) -> str:
    """``value`` as a working directory: a non-empty path (absolute, or under the home)."""
    if not isinstance(value, str):
        raise TypeError(f"working_dir must be a str, not {type(value).__name__}")
    path = value.strip()
    if not path or "\0" in path:
        raise ValueError(f"working_dir must be a non-empty path without NUL, not {value!r}")
    if ".." in path.split("/"):
        raise ValueError(f"working_dir must not contain '..': {value!r}")
    return path


def check_idle_timeout(value: object) -> float:
    """``value`` as an idle timeout: a positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"idle_timeout must be a number of seconds, not {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"idle_timeout must be a positive number of seconds, not {value}")
    return float(value)


def input_path(name: object) -> str:
    """The relative path an input file named ``name`` is written to, under the working
    directory; refuses names that would land elsewhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an input file needs a non-empty name, not {name!r}")
    if "\0" in name or name.startswith("/"):
        raise ValueError(f"input file name {name!r} must be a relative path without NUL")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"input file name {name!r} must stay inside the working directory")
    return "/".join(parts)


def input_bytes(name: str, content: object) -> bytes:
    """The bytes of an input file: ADK's ``File.content`` is raw bytes, or base64 as text."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    if isinstance(content, str):
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(
                f"input file {name!r}: text content must be base64 (ADK's File convention); "
                "give bytes for raw content"
            ) from e
    raise TypeError(f"input file {name!r}: content must be bytes or base64 text, not {type(content).__name__}")


def mime_type(name: str) -> str:
    """The MIME type a file's name suggests, ``application/octet-stream`` when none does."""
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def resolve(working_dir: str, path: str) -> str:
    """``path`` in the sandbox: as it is when absolute, else under ``working_dir``."""
    if path.startswith("/"):
        return posixpath.normpath(path)
    return posixpath.normpath(posixpath.join(working_dir, path))


@dataclass(frozen=True)
class Seen:
    """What a file looked like when listed, to tell whether a run wrote it."""

    size: int
    modified_ms: int


def visible_files(working_dir: str, entries: Iterable[FileEntry]) -> dict[str, Seen]:
    """The regular files among ``entries`` (a listing of ``working_dir``) by path relative to
    it, leaving out hidden files and directories (caches and tools' state, such as
    ``.cache/matplotlib``) and ``__pycache__``."""
    prefix = working_dir.rstrip("/") + "/"
    out: dict[str, Seen] = {}
    for entry in entries:
        if entry.type != "file" or not entry.path.startswith(prefix):
            continue
        rel = entry.path[len(prefix) :]
        if any(part.startswith(".") or part == "__pycache__" for part in rel.split("/")):
            continue
        out[rel] = Seen(entry.size, int(entry.modified_at.timestamp() * 1000))
    return out
