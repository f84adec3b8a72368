"""The objects the API takes and answers, shared by the sync and async clients.

Answers are parsed into frozen dataclasses (``from_json``); fields the server adds later are
ignored. Times the server gives as Unix milliseconds become timezone-aware
:class:`~datetime.datetime` values in UTC. Request-side helpers (:class:`Resources`,
:class:`Network`, :class:`Lifecycle`, :class:`JobInput`, :class:`InputFile`) check their
values when made and turn into the JSON the server expects with ``to_json``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from ._args import mapping as _check_map
from .errors import CommandExitError, MoatError, SandboxTimeoutError, error_for

__all__ = [
    "ApiKey",
    "Blob",
    "Build",
    "BuildLogs",
    "CodeContext",
    "CreatedKey",
    "Denial",
    "ExecEnd",
    "ExecEvent",
    "ExecOutput",
    "ExecResult",
    "ExecStart",
    "Execution",
    "ExecutionError",
    "FileEntry",
    "InputFile",
    "Job",
    "JobInput",
    "JobOutput",
    "JobWebhook",
    "KeyQuotas",
    "Lifecycle",
    "Logs",
    "Network",
    "NetworkStats",
    "OutputFile",
    "PoolStatus",
    "PullEvent",
    "ResourceLimits",
    "Resources",
    "Result",
    "RunResult",
    "SandboxInfo",
    "SandboxNetwork",
    "Snapshot",
    "Template",
    "TemplateSpec",
]

JSON = dict[str, Any]

SANDBOX_STATES = ("starting", "running", "paused", "killed", "failed")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "timed_out")
BUILD_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def _time(ms: Any) -> datetime | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)


def _req_time(ms: Any) -> datetime:
    t = _time(ms)
    if t is None:
        raise MoatError("the server's answer lacks a time it must have", code="bad_answer")
    return t


def _strmap(v: Any) -> dict[str, str]:
    if not v:
        return {}
    return {str(k): str(x) for k, x in dict(v).items()}


def _strlist(v: Any) -> list[str]:
    return [str(x) for x in (v or [])]


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MoatError(f"the server sent malformed base64: {e}", code="bad_answer") from e


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """Limits a create asks for; each one left ``None`` takes the template's default.

    ``memory`` and ``disk`` are sizes as the server reads them (``"512M"``, ``"1G"``) or a
    number of bytes; ``cpus`` may be fractional (``0.5``); ``pids`` bounds processes and
    threads.
    """

    memory: str | int | None = None
    cpus: float | None = None
    pids: int | None = None
    disk: str | int | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "disk"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise TypeError(f"resources.{name} must be a size string or a number of bytes")
            if isinstance(v, int) and v <= 0:
                raise ValueError(f"resources.{name} must be positive, not {v}")
            if isinstance(v, str) and not v.strip():
                raise ValueError(f"resources.{name} must not be empty")
        if self.cpus is not None:
            if isinstance(self.cpus, bool) or not isinstance(self.cpus, (int, float)):
                raise TypeError("resources.cpus must be a number")
            if self.cpus <= 0:
                raise ValueError(f"resources.cpus must be positive, not {self.cpus}")
        if self.pids is not None:
            if isinstance(self.pids, bool) or not isinstance(self.pids, int):
                raise TypeError("resources.pids must be an integer")
            if self.pids <= 0:
                raise ValueError(f"resources.pids must be positive, not {self.pids}")

    @classmethod
    def coerce(cls, value: Resources | Mapping[str, Any] | None) -> Resources | None:
        """``value`` as :class:`Resources` (a mapping takes the same keys)."""
        if value is None or isinstance(value, Resources):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"memory", "cpus", "pids", "disk"}
            if unknown:
                raise ValueError(f"unknown resources: {', '.join(sorted(unknown))}")
            return cls(**dict(value))
        raise TypeError(f"resources must be Resources or a mapping, not {type(value).__name__}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Resources:
        """Parses a ``ResourceRequest`` (as in a template's spec)."""
        return cls(
            memory=data.get("memory"),
            cpus=data.get("cpus"),
            pids=data.get("pids"),
            disk=data.get("disk"),
        )

    def to_json(self) -> JSON:
        """The ``ResourceRequest`` JSON."""
        out: JSON = {}
        if self.memory is not None:
            out["memory"] = str(self.memory)
        if self.cpus is not None:
            out["cpus"] = float(self.cpus)
        if self.pids is not None:
            out["pids"] = self.pids
        if self.disk is not None:
            out["disk"] = str(self.disk)
        return out


@dataclass(frozen=True)
class Network:
    """A sandbox's network policy.

    With ``internet`` false and no ``allow`` rule the sandbox has no network (loopback only).
    Rules are CIDR networks, IP addresses, domains or ``*.domain``, each optionally with
    ``:PORT`` or ``:LOW-HIGH``; ``dns_servers`` are resolvers the server asks for the
    sandbox's names.
    """

    internet: bool = False
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.internet, bool):
            raise TypeError("network.internet must be a bool")
        for name in ("allow", "deny", "dns_servers"):
            v = getattr(self, name)
            if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                raise TypeError(f"network.{name} must be a sequence of strings")
            object.__setattr__(self, name, tuple(v))

    @classmethod
    def coerce(cls, value: Network | Mapping[str, Any] | bool | None) -> Network | None:
        """``value`` as a :class:`Network`: ``True`` is the internet, ``False`` none."""
        if value is None or isinstance(value, Network):
            return value
        if isinstance(value, bool):
            return cls(internet=value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"internet", "allow", "deny", "dns_servers"}
            if unknown:
                raise ValueError(f"unknown network fields: {', '.join(sorted(unknown))}")
            return cls(
                internet=value.get("internet", False),
                allow=tuple(value.get("allow", ())),
                deny=tuple(value.get("deny", ())),
                dns_servers=tuple(value.get("dns_servers", ())),
            )
        raise TypeError(f"network must be Network, a mapping or a bool, not {type(value).__name__}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Network:
        """Parses a ``Network``."""
        return cls(
            internet=bool(data.get("internet", False)),
            allow=tuple(_strlist(data.get("allow"))),
            deny=tuple(_strlist(data.get("deny"))),
            dns_servers=tuple(_strlist(data.get("dns_servers"))),
        )

    def to_json(self) -> JSON:
        """The ``Network`` JSON."""
        out: JSON = {"internet": self.internet}
        if self.allow:
            out["allow"] = list(self.allow)
        if self.deny:
            out["deny"] = list(self.deny)
        if self.dns_servers:
            out["dns_servers"] = list(self.dns_servers)
        return out


@dataclass(frozen=True)
class Lifecycle:
    """What a sandbox's time running out does (``"kill"`` or ``"pause"``), and whether a call
    that needs a paused sandbox resumes it first."""

    on_timeout: Literal["kill", "pause"] = "kill"
    auto_resume: bool = False

    def __post_init__(self) -> None:
        if self.on_timeout not in ("kill", "pause"):
            raise ValueError(f"on_timeout must be 'kill' or 'pause', not {self.on_timeout!r}")
        if not isinstance(self.auto_resume, bool):
            raise TypeError("auto_resume must be a bool")

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Lifecycle:
        """Parses a ``Lifecycle``."""
        data = data or {}
        on_timeout = data.get("on_timeout", "kill")
        return cls(
            on_timeout="pause" if on_timeout == "pause" else "kill",
            auto_resume=bool(data.get("auto_resume", False)),
        )

    def to_json(self) -> JSON:
        """The ``Lifecycle`` JSON."""
        return {"on_timeout": self.on_timeout, "auto_resume": self.auto_resume}


@dataclass(frozen=True)
class InputFile:
    """A file written into the sandbox of a one-shot run before it starts."""

    path: str
    content: bytes | str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("a file's path must be a non-empty string")
        if not isinstance(self.content, (bytes, str)):
            raise TypeError(f"the content of {self.path!r} must be bytes or str")

    def to_json(self) -> JSON:
        """The ``InputFile`` JSON."""
        if isinstance(self.content, str):
            return {"path": self.path, "content": self.content}
        return {"path": self.path, "content_b64": base64.b64encode(self.content).decode()}


@dataclass(frozen=True)
class JobInput:
    """A file written into a job's sandbox before it runs: exactly one of ``content`` (text or
    bytes), ``blob`` (a digest from :meth:`~moat.Client.jobs` ``upload_blob``) and
    ``job_output`` (``(job_id, output_path)`` of an earlier job of the caller's)."""

    path: str
    content: bytes | str | None = None
    blob: str | None = None
    job_output: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("a job input's path must be a non-empty string")
        given = [x for x in (self.content, self.blob, self.job_output) if x is not None]
        if len(given) != 1:
            raise ValueError(
                f"job input {self.path!r} needs exactly one of content, blob and job_output"
            )
        if self.content is not None and not isinstance(self.content, (bytes, str)):
            raise TypeError(f"the content of job input {self.path!r} must be bytes or str")
        if self.job_output is not None:
            if len(self.job_output) != 2 or not all(isinstance(x, str) for x in self.job_output):
                raise TypeError("job_output must be a (job_id, output_path) pair of strings")

    def to_json(self) -> JSON:
        """The ``JobInput`` JSON."""
        out: JSON = {"path": self.path}
        if isinstance(self.content, str):
            out["content"] = self.content
        elif isinstance(self.content, bytes):
            out["content_b64"] = base64.b64encode(self.content).decode()
        elif self.blob is not None:
            out["blob"] = self.blob
        elif self.job_output is not None:
            out["job_output"] = {"job": self.job_output[0], "path": self.job_output[1]}
        return out


# --- sandboxes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceLimits:
    """A sandbox's resolved limits."""

    memory_bytes: int
    cpu_millis: int
    pids: int
    disk_bytes: int

    @property
    def cpus(self) -> float:
        """The CPU limit in CPUs."""
        return self.cpu_millis / 1000

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResourceLimits:
        """Parses ``ResourceLimits``."""
        return cls(
            memory_bytes=int(data.get("memory_bytes", 0)),
            cpu_millis=int(data.get("cpu_millis", 0)),
            pids=int(data.get("pids", 0)),
            disk_bytes=int(data.get("disk_bytes", 0)),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the server describes it.

    ``access_token`` and ``traffic_access_token`` are present in the answers of create and get
    (not in listings).
    """

    id: str
    template: str
    state: str
    metadata: dict[str, str]
    resources: ResourceLimits
    created_at: datetime
    expires_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    public_traffic: bool
    backend: str
    lifecycle: Lifecycle
    access_token: str | None = field(default=None, repr=False)
    traffic_access_token: str | None = field(default=None, repr=False)

    @property
    def is_running(self) -> bool:
        """Whether it runs now."""
        return self.state == "running"

    @property
    def is_active(self) -> bool:
        """Whether it still holds resources (starting, running or paused)."""
        return self.state in ("starting", "running", "paused")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxInfo:
        """Parses a ``Sandbox``."""
        return cls(
            id=str(data["id"]),
            template=str(data.get("template", "")),
            state=str(data.get("state", "")),
            metadata=_strmap(data.get("metadata")),
            resources=ResourceLimits.from_json(data.get("resources") or {}),
            created_at=_req_time(data.get("created_at")),
            expires_at=_time(data.get("expires_at")),
            ended_at=_time(data.get("ended_at")),
            end_reason=data.get("end_reason"),
            public_traffic=bool(data.get("public_traffic", False)),
            backend=str(data.get("backend", "")),
            lifecycle=Lifecycle.from_json(data.get("lifecycle")),
            access_token=data.get("access_token"),
            traffic_access_token=data.get("traffic_access_token"),
        )


@dataclass(frozen=True)
class Denial:
    """One connection or DNS name a sandbox's network policy refused."""

    at: datetime
    target: str
    reason: str


@dataclass(frozen=True)
class NetworkStats:
    """What a sandbox did with its network."""

    connections: int
    denied: int
    bytes_out: int
    bytes_in: int
    dns_answered: int
    dns_refused: int
    recent_denials: list[Denial]


@dataclass(frozen=True)
class SandboxNetwork:
    """A sandbox's network policy and, while it has a network, its counters."""

    network: Network
    stats: NetworkStats | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SandboxNetwork:
        """Parses a ``SandboxNetwork``."""
        s = data.get("stats")
        stats = None
        if s is not None:
            stats = NetworkStats(
                connections=int(s.get("connections", 0)),
                denied=int(s.get("denied", 0)),
                bytes_out=int(s.get("bytes_out", 0)),
                bytes_in=int(s.get("bytes_in", 0)),
                dns_answered=int(s.get("dns_answered", 0)),
                dns_refused=int(s.get("dns_refused", 0)),
                recent_denials=[
                    Denial(at=_req_time(d.get("at_ms")), target=d["target"], reason=d["reason"])
                    for d in s.get("recent_denials") or []
                ],
            )
        return cls(network=Network.from_json(data.get("network") or {}), stats=stats)


# --- exec -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    """What a command did.

    ``stdout`` and ``stderr`` are the output as text (UTF-8, invalid bytes replaced);
    ``stdout_bytes`` and ``stderr_bytes`` the exact bytes. ``exit_code`` is ``None`` when the
    command was killed (by a signal, its timeout or the OOM killer); ``signal`` then says how.
    """

    stdout_bytes: bytes
    stderr_bytes: bytes
    exit_code: int | None
    signal: str | None
    duration_ms: int
    timed_out: bool
    oom_killed: bool
    truncated: bool = False

    @property
    def stdout(self) -> str:
        """Standard output as text."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error as text."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def duration(self) -> float:
        """Wall time from start to end, seconds."""
        return self.duration_ms / 1000

    @property
    def ok(self) -> bool:
        """Whether it exited 0."""
        return self.exit_code == 0

    def check(self) -> ExecResult:
        """Returns this result if the command exited 0; raises otherwise.

        Raises :class:`~moat.errors.SandboxTimeoutError` after its timeout and
        :class:`~moat.errors.CommandExitError` for any other failure.
        """
        if self.timed_out:
            raise SandboxTimeoutError(
                f"the command ran past its timeout ({self.duration:.1f} s) and was killed",
                code="timed_out",
            )
        if self.exit_code != 0:
            how = f"exited {self.exit_code}" if self.exit_code is not None else "was killed"
            if self.oom_killed:
                how += " (out of memory)"
            elif self.signal:
                how += f" ({self.signal})"
            tail = self.stderr.strip()[-500:]
            raise CommandExitError(f"the command {how}" + (f": {tail}" if tail else ""), self)
        return self

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecResult:
        """Parses an ``ExecResult`` whose output is base64 (the SDK always asks for it)."""
        return cls(
            stdout_bytes=_b64(data.get("stdout", "")),
            stderr_bytes=_b64(data.get("stderr", "")),
            **_end_fields(data),
            truncated=bool(data.get("truncated", False)),
        )


def _end_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    code = data.get("exit_code")
    return {
        "exit_code": None if code is None else int(code),
        "signal": data.get("signal"),
        "duration_ms": int(data.get("duration_ms", 0)),
        "timed_out": bool(data.get("timed_out", False)),
        "oom_killed": bool(data.get("oom_killed", False)),
    }


@dataclass(frozen=True)
class ExecStart:
    """A streamed command started; ``pid`` is its pid in the sandbox."""

    pid: int


@dataclass(frozen=True)
class ExecOutput:
    """Output of a streamed command as it arrived.

    ``data`` is the exact bytes; ``text`` their decoding, where a character split between two
    events is held back and given whole with the next event of the same stream.
    """

    stream: Literal["stdout", "stderr"]
    data: bytes
    text: str


@dataclass(frozen=True)
class ExecEnd:
    """How a streamed command ended: the last event."""

    exit_code: int | None
    signal: str | None
    duration_ms: int
    timed_out: bool
    oom_killed: bool

    @property
    def duration(self) -> float:
        """Wall time from start to end, seconds."""
        return self.duration_ms / 1000


ExecEvent = ExecStart | ExecOutput | ExecEnd


class ExecEventDecoder:
    """Turns the lines of an exec stream into events, decoding output incrementally."""

    def __init__(self) -> None:
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")("replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self.end: ExecEnd | None = None

    def event(self, line: Mapping[str, Any]) -> ExecEvent | None:
        """The event of one line; ``None`` for a line of a type this SDK does not know.

        An ``error`` line raises the :class:`~moat.errors.MoatError` it carries.
        """
        kind = line.get("type")
        if kind == "start":
            return ExecStart(pid=int(line.get("pid", 0)))
        if kind in ("stdout", "stderr"):
            data = _b64(str(line.get("data", "")))
            text = self._decoders[kind].decode(data)
            return ExecOutput(
                stream="stdout" if kind == "stdout" else "stderr", data=data, text=text
            )
        if kind == "end":
            self.end = ExecEnd(**_end_fields(line))
            return self.end
        if kind == "error":
            raise error_for(None, line.get("code"), str(line.get("message", "the stream failed")))
        return None


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """A file, directory or other entry in a sandbox.

    ``type`` is ``file``, ``dir``, ``symlink`` or ``other``; ``mode`` the permission bits
    (``0o644``); ``symlink_target`` where a symbolic link points.
    """

    name: str
    path: str
    type: str
    size: int
    mode: int
    owner: str
    group: str
    modified_at: datetime
    symlink_target: str | None

    @property
    def is_dir(self) -> bool:
        """Whether it is a directory."""
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        """Whether it is a regular file."""
        return self.type == "file"

    @property
    def is_symlink(self) -> bool:
        """Whether it is a symbolic link."""
        return self.type == "symlink"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        """Parses a ``FileEntry``."""
        return cls(
            name=str(data["name"]),
            path=str(data["path"]),
            type=str(data.get("type", "other")),
            size=int(data.get("size", 0)),
            mode=int(data.get("mode", 0)),
            owner=str(data.get("owner", "")),
            group=str(data.get("group", "")),
            modified_at=_req_time(data.get("modified_at", 0)),
            symlink_target=data.get("symlink_target"),
        )


# --- snapshots and templates ----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A frozen copy of a sandbox's files (and, with ``memory``, its processes)."""

    id: str
    name: str | None
    sandbox_id: str
    template: str
    resources: ResourceLimits
    size_bytes: int
    memory: bool
    created_at: datetime

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        """Parses a ``Snapshot``."""
        return cls(
            id=str(data["id"]),
            name=data.get("name"),
            sandbox_id=str(data.get("sandbox_id", "")),
            template=str(data.get("template", "")),
            resources=ResourceLimits.from_json(data.get("resources") or {}),
            size_bytes=int(data.get("size_bytes", 0)),
            memory=bool(data.get("memory", False)),
            created_at=_req_time(data.get("created_at")),
        )


@dataclass(frozen=True)
class TemplateSpec:
    """A template's definition.

    ``rootfs`` is ``"host"``, or a one-key mapping: ``{"image": REF}``, ``{"dir": PATH}``
    (admin keys) or ``{"build": DIGEST}`` (made by builds only). Other fields are as the
    server documents them; ``None`` leaves a field to its default.
    """

    rootfs: str | dict[str, str] = "host"
    resources: Resources | None = None
    max_resources: Resources | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    start: str | None = None
    ready: str | None = None
    ready_timeout_secs: int | None = None
    timeout_secs: int | None = None
    pool_size: int = 0
    backend: str | None = None
    snapshot: str | None = None
    network: Network | None = None

    @property
    def image(self) -> str | None:
        """The image reference of a template made from one (pinned to its digest)."""
        return self.rootfs.get("image") if isinstance(self.rootfs, dict) else None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TemplateSpec:
        """Parses a ``TemplateSpec``."""
        rootfs = data.get("rootfs", "host")
        net = data.get("network")
        res = data.get("resources")
        maxres = data.get("max_resources")
        return cls(
            rootfs=dict(rootfs) if isinstance(rootfs, Mapping) else str(rootfs),
            resources=Resources.from_json(res) if res else None,
            max_resources=Resources.from_json(maxres) if maxres else None,
            env=_strmap(data.get("env")),
            user=data.get("user"),
            workdir=data.get("workdir"),
            start=data.get("start"),
            ready=data.get("ready"),
            ready_timeout_secs=data.get("ready_timeout_secs"),
            timeout_secs=data.get("timeout_secs"),
            pool_size=int(data.get("pool_size", 0)),
            backend=data.get("backend"),
            snapshot=data.get("snapshot"),
            network=Network.from_json(net) if net is not None else None,
        )

    def to_json(self) -> JSON:
        """The ``TemplateSpec`` JSON (fields at their default left out)."""
        if isinstance(self.rootfs, str):
            if self.rootfs != "host":
                raise ValueError(
                    "rootfs must be 'host' or a mapping such as {'image': REF}, "
                    f"not {self.rootfs!r}"
                )
            rootfs: Any = "host"
        elif isinstance(self.rootfs, Mapping) and len(self.rootfs) == 1:
            ((kind, value),) = self.rootfs.items()
            if kind not in ("image", "dir", "build") or not isinstance(value, str) or not value:
                raise ValueError(f"rootfs {dict(self.rootfs)!r} is not one of image, dir or build")
            rootfs = {kind: value}
        else:
            raise ValueError("rootfs must be 'host' or a one-key mapping such as {'image': REF}")
        out: JSON = {"rootfs": rootfs}
        if self.resources is not None:
            out["resources"] = self.resources.to_json()
        if self.max_resources is not None:
            out["max_resources"] = self.max_resources.to_json()
        if self.env:
            out["env"] = _check_map("env", self.env)
        for name in ("user", "workdir", "start", "ready", "backend", "snapshot"):
            v = getattr(self, name)
            if v is not None:
                if not isinstance(v, str):
                    raise TypeError(f"{name} must be a string")
                out[name] = v
        for name in ("ready_timeout_secs", "timeout_secs"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ValueError(f"{name} must be a positive whole number of seconds")
                out[name] = v
        if self.pool_size:
            if (
                isinstance(self.pool_size, bool)
                or not isinstance(self.pool_size, int)
                or self.pool_size < 0
            ):
                raise ValueError("pool_size must be a whole number, 0 or more")
            out["pool_size"] = self.pool_size
        if self.network is not None:
            out["network"] = self.network.to_json()
        return out


@dataclass(frozen=True)
class PoolStatus:
    """A template's warm pool: the size it aims for now, the members ready to claim, and the
    members evicted since the server started for going over the pools' memory budget."""

    target: int
    ready: int
    evicted: int


@dataclass(frozen=True)
class Template:
    """A template: built in (every tenant sees it) or the tenant's own."""

    name: str
    builtin: bool
    spec: TemplateSpec
    created_at: datetime
    pool: PoolStatus
    #: The build that made it (for a tag, the build of the template it was copied from).
    build_id: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Template:
        """Parses a ``Template``."""
        pool = data.get("pool") or {}
        return cls(
            name=str(data["name"]),
            builtin=bool(data.get("builtin", False)),
            spec=TemplateSpec.from_json(data.get("spec") or {}),
            created_at=_req_time(data.get("created_at", 0)),
            pool=PoolStatus(
                target=int(pool.get("target", 0)),
                ready=int(pool.get("ready", 0)),
                evicted=int(pool.get("evicted", 0)),
            ),
            build_id=data.get("build_id"),
        )


@dataclass(frozen=True)
class PullEvent:
    """How the pull of a template's image goes (``type``: ``resolved``, ``progress`` or
    ``unpacked``); the fields of other types are ``None``."""

    type: str
    layers: int | None = None
    bytes: int | None = None
    layer: int | None = None
    received: int | None = None
    size: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PullEvent:
        """Parses a ``TemplateCreateEvent`` other than the last."""

        def opt(key: str) -> int | None:
            v = data.get(key)
            return None if v is None else int(v)

        return cls(
            type=str(data.get("type")),
            layers=opt("layers"),
            bytes=opt("bytes"),
            layer=opt("layer"),
            received=opt("received"),
            size=opt("size"),
        )


# --- builds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """A template build from a Dockerfile.

    ``status`` is ``queued``, ``running``, ``succeeded``, ``failed`` (see ``error``) or
    ``cancelled``.
    """

    id: str
    template: str
    status: str
    error: str | None
    steps: int
    steps_done: int
    steps_cached: int
    image: str | None
    created_at: datetime
    finished_at: datetime | None
    warnings: list[str]
    #: The more tags of its template's name it writes.
    tags: list[str] = field(default_factory=list)

    @property
    def is_final(self) -> bool:
        """Whether it is over."""
        return self.status in ("succeeded", "failed", "cancelled")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Build:
        """Parses a ``Build``."""
        return cls(
            id=str(data["id"]),
            template=str(data.get("template", "")),
            status=str(data.get("status", "")),
            error=data.get("error"),
            steps=int(data.get("steps", 0)),
            steps_done=int(data.get("steps_done", 0)),
            steps_cached=int(data.get("steps_cached", 0)),
            image=data.get("image"),
            created_at=_req_time(data.get("created_at")),
            finished_at=_time(data.get("finished_at")),
            warnings=_strlist(data.get("warnings")),
            tags=_strlist(data.get("tags")),
        )


@dataclass(frozen=True)
class BuildLogs:
    """A piece of a build's log: ``text`` from the offset asked, the offset to ask next, and
    whether the build is over and the log complete."""

    text: str
    next_offset: int
    done: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildLogs:
        """Parses ``BuildLogs``."""
        return cls(
            text=str(data.get("text", "")),
            next_offset=int(data.get("next_offset", 0)),
            done=bool(data.get("done", False)),
        )


# --- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOutput:
    """A file a job kept: its absolute path in the sandbox, size and blob digest."""

    path: str
    size: int
    digest: str


@dataclass(frozen=True)
class JobWebhook:
    """A job's completion webhook and how its delivery went."""

    url: str
    secret: str = field(repr=False)
    attempts: int
    delivered_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class Job:
    """An asynchronous run.

    ``state`` is ``queued``, ``running``, ``succeeded``, ``failed``, ``cancelled`` or
    ``timed_out``. ``stdout_tail`` and ``stderr_tail`` are the last 4 KiB of each log.
    """

    id: str
    state: str
    template: str
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    exit_code: int | None
    error: str | None
    stdout_tail: str
    stderr_tail: str
    outputs: list[JobOutput]
    output_errors: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: JobWebhook | None

    @property
    def is_final(self) -> bool:
        """Whether it is over."""
        return self.state not in ("queued", "running")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        """Parses a ``Job``."""
        hook = data.get("webhook")
        code = data.get("exit_code")
        return cls(
            id=str(data["id"]),
            state=str(data.get("state", "")),
            template=str(data.get("template", "")),
            idempotency_key=data.get("idempotency_key"),
            attempts=int(data.get("attempts", 0)),
            max_attempts=int(data.get("max_attempts", 0)),
            exit_code=None if code is None else int(code),
            error=data.get("error"),
            stdout_tail=str(data.get("stdout_tail", "")),
            stderr_tail=str(data.get("stderr_tail", "")),
            outputs=[
                JobOutput(
                    path=str(o["path"]), size=int(o.get("size", 0)), digest=str(o.get("digest", ""))
                )
                for o in data.get("outputs") or []
            ],
            output_errors=_strlist(data.get("output_errors")),
            created_at=_req_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            webhook=None
            if hook is None
            else JobWebhook(
                url=str(hook.get("url", "")),
                secret=str(hook.get("secret", "")),
                attempts=int(hook.get("attempts", 0)),
                delivered_at=_time(hook.get("delivered_at")),
                last_error=hook.get("last_error"),
            ),
        )


@dataclass(frozen=True)
class Blob:
    """A stored blob: what job inputs name it by (``sha256:…``) and its size."""

    digest: str
    size: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Blob:
        """Parses a ``Blob``."""
        return cls(digest=str(data["digest"]), size=int(data.get("size", 0)))


# --- one-shot runs --------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputFile:
    """A file a one-shot run read back: its ``content``, or the ``error`` saying why not."""

    path: str
    content: bytes | None
    error: str | None

    @property
    def text(self) -> str:
        """The content as UTF-8 text; raises the file's error if it was not read."""
        if self.content is None:
            raise MoatError(f"{self.path}: {self.error or 'not read'}", code="output_missing")
        return self.content.decode("utf-8")


@dataclass(frozen=True)
class RunResult(ExecResult):
    """What a one-shot run did: the command's result, the output files in the order asked,
    and the id of the sandbox it used (destroyed by now)."""

    files: list[OutputFile] = field(default_factory=list)
    sandbox_id: str = ""

    def file(self, path: str) -> OutputFile:
        """The output file asked for as ``path``."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        """Parses a ``RunResult`` (its output as text: runs carry no encoding choice)."""
        return cls(
            stdout_bytes=str(data.get("stdout", "")).encode(),
            stderr_bytes=str(data.get("stderr", "")).encode(),
            **_end_fields(data),
            truncated=bool(data.get("truncated", False)),
            files=[
                OutputFile(
                    path=str(f["path"]),
                    content=None if f.get("content_b64") is None else _b64(f["content_b64"]),
                    error=f.get("error"),
                )
                for f in data.get("files") or []
            ],
            sandbox_id=str(data.get("sandbox_id", "")),
        )


# --- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyQuotas:
    """A key's limits; ``None`` is unlimited (or the server's default)."""

    max_sandboxes: int | None = None
    max_memory_bytes: int | None = None
    max_pids: int | None = None
    max_snapshot_bytes: int | None = None
    requests_per_minute: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> KeyQuotas:
        """Parses ``KeyQuotas``."""
        data = data or {}
        return cls(
            max_sandboxes=data.get("max_sandboxes"),
            max_memory_bytes=data.get("max_memory_bytes"),
            max_pids=data.get("max_pids"),
            max_snapshot_bytes=data.get("max_snapshot_bytes"),
            requests_per_minute=data.get("requests_per_minute"),
        )


@dataclass(frozen=True)
class ApiKey:
    """An API key (never its secret); ``role`` is ``user`` or ``admin``."""

    id: str
    tenant: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    quotas: KeyQuotas

    @classmethod
    def _fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": str(data["id"]),
            "tenant": str(data.get("tenant", "")),
            "name": str(data.get("name", "")),
            "role": str(data.get("role", "user")),
            "created_at": _req_time(data.get("created_at")),
            "revoked_at": _time(data.get("revoked_at")),
            "quotas": KeyQuotas.from_json(data.get("quotas")),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ApiKey:
        """Parses an ``ApiKey``."""
        return cls(**cls._fields(data))


@dataclass(frozen=True)
class CreatedKey(ApiKey):
    """A key just made, with its ``secret``: shown this once, never again."""

    secret: str = field(default="", repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CreatedKey:
        """Parses a ``CreatedKey``."""
        return cls(**cls._fields(data), secret=str(data["secret"]))


# --- code interpreter -----------------------------------------------------------------------


@dataclass(frozen=True)
class CodeContext:
    """A stateful code context: its variables (and, in bash, working directory) persist
    between executions."""

    id: str
    language: str
    cwd: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CodeContext:
        """Parses a context."""
        return cls(
            id=str(data["id"]), language=str(data.get("language", "")), cwd=str(data.get("cwd", ""))
        )


_RESULT_FORMATS = (
    "text",
    "html",
    "markdown",
    "svg",
    "png",
    "jpeg",
    "pdf",
    "latex",
    "javascript",
    "json",
    "data",
    "chart",
)


@dataclass(frozen=True)
class Result:
    """A rich result of executed code: the value of its last expression
    (``is_main_result``) or something it displayed (a figure, ``display(obj)``).

    Each representation the object offered is set: ``text``, ``html``, ``markdown``,
    ``svg``, ``latex``, ``javascript``; ``png``, ``jpeg`` and ``pdf`` as base64; ``json``,
    ``data`` and ``chart`` as parsed JSON.
    """

    is_main_result: bool = False
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    javascript: str | None = None
    json: Any = None
    data: Any = None
    chart: Any = None
    extra: Any = None

    def formats(self) -> list[str]:
        """The names of the representations it has."""
        return [f for f in _RESULT_FORMATS if getattr(self, f) is not None]

    def png_bytes(self) -> bytes | None:
        """The PNG image decoded, if it has one."""
        return None if self.png is None else _b64(self.png)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        """Parses a ``result`` line."""
        return cls(
            is_main_result=bool(data.get("is_main_result", False)),
            **{f: data.get(f) for f in (*_RESULT_FORMATS, "extra")},
        )


@dataclass(frozen=True)
class ExecutionError:
    """An error raised by executed code: its ``name`` (``ZeroDivisionError``), ``value`` and
    ``traceback``."""

    name: str
    value: str
    traceback: str


@dataclass
class Logs:
    """What executed code printed, in pieces as they came."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class Execution:
    """What an execution of code did: its results, its output, and the error it raised."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None

    @property
    def text(self) -> str | None:
        """The text of the main result (the last expression's value), if any."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None

    @property
    def stdout(self) -> str:
        """Everything printed on standard output."""
        return "".join(self.logs.stdout)

    @property
    def stderr(self) -> str:
        """Everything printed on standard error."""
        return "".join(self.logs.stderr)
