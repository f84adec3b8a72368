"""Exceptions raised by the SDK.

Every failure the server reports becomes a :class:`MoatError` subclass chosen by the answer's
HTTP status (and, where one status covers several cases, by its ``code``), carrying the
server's ``status``, ``code`` and ``message``. Failures that never reached the server (no
connection, a client-side deadline) are :class:`MoatError` subclasses too, with ``status``
``None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import ExecResult

__all__ = [
    "AuthenticationError",
    "CommandExitError",
    "ConfigurationError",
    "ConflictError",
    "InsufficientStorageError",
    "InternalServerError",
    "InvalidRequestError",
    "MoatConnectionError",
    "MoatError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RateLimitError",
    "SandboxTimeoutError",
    "UnavailableError",
    "UnsupportedError",
    "error_for",
]


class MoatError(Exception):
    """Base class of every error the SDK raises.

    ``status`` is the HTTP status of the server's answer (``None`` when the failure happened
    before or outside one), ``code`` the machine-readable code (``not_found``,
    ``quota_exceeded``, ...), ``message`` the server's sentence for people.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        #: Seconds the server asked the client to wait before trying again (``Retry-After``).
        self.retry_after = retry_after

    def __str__(self) -> str:
        if self.status is None and self.code is None:
            return self.message
        detail = " ".join(str(p) for p in (self.status, self.code) if p is not None)
        return f"{self.message} ({detail})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r})"
        )


class ConfigurationError(MoatError, ValueError):
    """The client is missing its server URL or API key, or was given a malformed one."""


class MoatConnectionError(MoatError, ConnectionError):
    """The server could not be reached, or the connection broke before an answer."""


class InvalidRequestError(MoatError):
    """400: the server refused the request as malformed (an unknown field, a bad value)."""


class AuthenticationError(MoatError):
    """401: no API key, or an unknown or revoked one."""


class PermissionDeniedError(MoatError):
    """403: the key's role may not do this, or the sandbox user may not touch that file."""


class NotFoundError(MoatError):
    """404: no such sandbox, template, snapshot, job, build, file or route for this tenant."""


class ConflictError(MoatError):
    """409: the object is not in a state that allows this (a killed or paused sandbox, a
    directory where a file was expected, ...)."""


class PayloadTooLargeError(MoatError):
    """413: a body or a snapshot over the server's limit."""


class QuotaExceededError(MoatError):
    """429: a quota of the key or tenant is full (sandboxes, memory, snapshots, runs).

    Every 429 is one of these; a request over the key's rate is the subclass
    :class:`RateLimitError`.
    """


class RateLimitError(QuotaExceededError):
    """429 ``rate_limited``: the key is over its request rate; see ``retry_after``."""


class InternalServerError(MoatError):
    """500: a fault of the server."""


class UnsupportedError(MoatError):
    """501: the sandbox cannot do this (a directory transfer without ``tar``)."""


class UnavailableError(MoatError):
    """503: the backend or the sandbox's agent cannot do it now; may succeed later."""


class SandboxTimeoutError(MoatError, TimeoutError):
    """Something ran out of time: the server's 504, a command that passed its timeout (from
    :meth:`ExecResult.check`), a client-side deadline (a request, ``run_code``, ``wait``)."""


class InsufficientStorageError(MoatError):
    """507: a disk is full (the sandbox's, or the server's data directory)."""


class CommandExitError(MoatError):
    """A command exited with a non-zero status or was killed (from :meth:`ExecResult.check`).

    ``result`` is the command's :class:`~moat.models.ExecResult`.
    """

    def __init__(self, message: str, result: ExecResult) -> None:
        super().__init__(message, code="command_failed")
        self.result = result


_BY_CODE: dict[str, type[MoatError]] = {
    "invalid": InvalidRequestError,
    "tar_failed": InvalidRequestError,
    "unauthenticated": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "method_not_allowed": InvalidRequestError,
    "conflict": ConflictError,
    "is_a_directory": ConflictError,
    "not_a_directory": ConflictError,
    "payload_too_large": PayloadTooLargeError,
    "too_large": PayloadTooLargeError,
    "quota_exceeded": QuotaExceededError,
    "rate_limited": RateLimitError,
    "internal": InternalServerError,
    "unsupported": UnsupportedError,
    "unavailable": UnavailableError,
    "timeout": SandboxTimeoutError,
    "insufficient_storage": InsufficientStorageError,
}

_BY_STATUS: dict[int, type[MoatError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: InvalidRequestError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: QuotaExceededError,
    500: InternalServerError,
    501: UnsupportedError,
    # A sandbox's port that does not answer through the server's proxy.
    502: UnavailableError,
    503: UnavailableError,
    504: SandboxTimeoutError,
    507: InsufficientStorageError,
}


def error_for(
    status: int | None,
    code: str | None,
    message: str,
    *,
    retry_after: float | None = None,
) -> MoatError:
    """The exception for an error the server answered (or sent in a stream, without status)."""
    cls: type[MoatError] | None = None
    if code is not None:
        cls = _BY_CODE.get(code)
        # A code the status contradicts (a proxy's answer) is judged by the status.
        if cls is not None and status is not None and _BY_STATUS.get(status) not in (cls, None):
            if not issubclass(cls, _BY_STATUS[status]):
                cls = None
    if cls is None and status is not None:
        cls = _BY_STATUS.get(status)
    # The sandbox proxy's answer for a sandbox that does not run (ended, paused, unknown): what
    # the API answers 409 for, and no retry mends.
    if status == 502 and "was not found" in message:
        cls = ConflictError
        code = code or "not_running"
    if cls is None:
        cls = MoatError
    return cls(message, status=status, code=code, retry_after=retry_after)
