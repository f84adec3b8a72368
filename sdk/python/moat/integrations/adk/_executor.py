"""``MoatCodeExecutor``: ADK's ``BaseCodeExecutor`` on moat sandboxes."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Optional

from google.adk.agents.invocation_context import InvocationContext
from google.adk.code_executors.base_code_executor import BaseCodeExecutor
from google.adk.code_executors.code_execution_utils import CodeExecutionInput, CodeExecutionResult, File
from pydantic import ConfigDict, Field, PrivateAttr, field_validator
from typing_extensions import override

from ...client import Client
from ...errors import ConflictError, MoatError, NotFoundError, SandboxTimeoutError
from ...models import CodeContext, Execution, Network, Resources
from ...sandbox import Sandbox
from . import _common

__all__ = ["MoatCodeExecutor"]

logger = logging.getLogger(__name__)

# Newer ADK releases give CodeExecutionResult an exit code; fill it in where it exists.
_RESULT_HAS_EXIT_CODE = "exit_code" in {f.name for f in dataclasses.fields(CodeExecutionResult)}

# A SystemExit with one of these values is how a script ends successfully.
_CLEAN_EXITS = ("", "0", "None")


@dataclasses.dataclass
class _Session:
    """The sandbox and interpreter context that hold one ADK session's state."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    sandbox: Sandbox | None = None
    context: CodeContext | None = None
    working_dir: str = ""
    #: ``time.monotonic()`` at the end of the session's last run.
    last_used: float = 0.0
    #: Set once the session was closed or expired: whoever waited for its lock starts anew.
    dropped: bool = False


# BaseCodeExecutor is a pydantic model; its subclass is one too, so its settings are validated
# fields and its live state private attributes.
class MoatCodeExecutor(BaseCodeExecutor):
    """Runs the code an ADK agent writes in moat sandboxes.

    Each call runs one ``CodeExecutionInput`` in a Python interpreter in a sandbox: its
    ``input_files`` are written to the working directory first (``File.content`` as raw bytes,
    or base64 text, as ADK gives it), and the result carries

    - ``stdout``: what the code printed on standard output, then what it printed on standard
      error (the interpreter does not keep the order between the two); as with ADK's other
      executors, which run code as a script, the value of a last bare expression is not shown;
    - ``stderr``: empty when the code ran to its end (ADK reads any ``stderr`` as a failure),
      else the traceback of the exception that stopped it, or a note that it ran past
      ``timeout_seconds`` and was interrupted (``sys.exit(0)`` counts as success);
    - ``output_files``: the files the run wrote or changed under the working directory (not
      hidden ones, not the inputs; none over 16 MiB, and at most 100 files and 64 MiB in
      all), named by their path relative to it, with the MIME type their name suggests.

    By default (``stateful=False``) each call has a fresh sandbox, killed when it returns. With
    ``stateful=True`` each ADK session (the input's ``execution_id``, which ADK sets to the
    session's id) keeps one sandbox and one interpreter: variables, imports and files persist
    from call to call, and sessions are isolated from each other. A session idle for
    ``idle_timeout`` seconds is ended (the server kills its sandbox); its next call starts
    afresh. :meth:`close_session` and :meth:`close` end sessions at once.

    ADK's flow, not the executor, honours ``error_retry_attempts``: it stops running code for
    an invocation after that many consecutive results with a ``stderr``.

    Settings beyond ADK's own: ``url`` and ``api_key`` (default ``MOAT_URL`` and
    ``MOAT_API_KEY``), ``template`` (the server's default when absent; a template also picks
    the isolation backend), ``network`` (a :class:`moat.Network`, a mapping of its fields,
    ``True`` for the internet, ``None`` for the template's policy; default ``False``: no
    network), ``resources``, ``env`` and ``metadata`` of the sandboxes, and ``working_dir``
    (under the sandbox user's home unless absolute; made when missing). ``timeout_seconds``
    (default 300; ``None``: no limit of the executor's own, the sandbox still ends an hour
    after the run began) bounds each run. Unknown settings are refused, and so is a missing
    URL or key, at construction.
    """

    model_config = ConfigDict(extra="forbid")

    url: Optional[str] = Field(default=None, frozen=True)
    """The moat server, ``http://HOST:PORT``; ``MOAT_URL`` when absent."""

    api_key: Optional[str] = Field(default=None, repr=False, exclude=True, frozen=True)
    """The API key; ``MOAT_API_KEY`` when absent."""

    template: Optional[str] = None
    """The template sandboxes are made from (the server's default, ``host``, when absent)."""

    network: Network | Mapping[str, Any] | bool | None = False
    """The sandboxes' network policy: ``False`` (the default) none, ``True`` the internet,
    ``None`` the template's, or a :class:`moat.Network` or mapping of its fields."""

    resources: Resources | Mapping[str, Any] | None = None
    """Resource limits of the sandboxes (the template's when absent)."""

    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the sandboxes."""

    metadata: dict[str, str] = Field(default_factory=dict)
    """Metadata the sandboxes are labelled with (for listing them on the server)."""

    working_dir: str = _common.DEFAULT_WORKING_DIR
    """Where code runs, inputs are written and outputs looked for: under the sandbox user's
    home unless absolute."""

    idle_timeout: float = 600.0
    """Seconds a stateful session may stay unused before its sandbox is killed."""

    timeout_seconds: Optional[int] = 300
    """Seconds a run may take before it is interrupted (``None``: no limit of its own)."""

    _client: Optional[Client] = PrivateAttr(default=None)
    _sessions: dict[str, _Session] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _closed: bool = PrivateAttr(default=False)

    @field_validator("network", mode="before")
    @classmethod
    def _check_network(cls, value: Any) -> Network | None:
        return Network.coerce(value)

    @field_validator("resources", mode="before")
    @classmethod
    def _check_resources(cls, value: Any) -> Resources | None:
        return Resources.coerce(value)

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("template must be a template's name, not blank")
        return value

    @field_validator("working_dir")
    @classmethod
    def _check_working_dir(cls, value: str) -> str:
        return _common.check_working_dir(value)

    @field_validator("idle_timeout")
    @classmethod
    def _check_idle_timeout(cls, value: float) -> float:
        return _common.check_idle_timeout(value)

    @field_validator("timeout_seconds")
    @classmethod
    def _check_timeout(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise ValueError(f"timeout_seconds must be positive or None, not {value}")
        return value

    @field_validator("error_retry_attempts")
    @classmethod
    def _check_retries(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"error_retry_attempts must be 0 or more, not {value}")
        return value

    def model_post_init(self, context: Any, /) -> None:
        """Opens the connection to the server, so a missing or malformed URL or key fails at
        construction (pydantic reports the SDK's ConfigurationError as a ValidationError)."""
        super().model_post_init(context)
        self._client = Client(url=self.url, api_key=self.api_key)

    # --- ADK's entry point ---

    @override
    def execute_code(
        self,
        invocation_context: InvocationContext,
        code_execution_input: CodeExecutionInput,
    ) -> CodeExecutionResult:
        """Runs ``code_execution_input`` in a sandbox (the session's, when stateful) and
        returns what it printed, how it failed, and the files it wrote.

        Raises :class:`ValueError` for an input it cannot run (a stateful call without an
        ``execution_id``, an input file named outside the working directory or whose text is
        not base64), and :class:`moat.MoatError` when the server cannot give it a sandbox.
        """
        code = code_execution_input.code
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        inputs = [
            (_common.input_path(f.name), _common.input_bytes(f.name, f.content))
            for f in code_execution_input.input_files
        ]
        client = self._open_client()
        self._expire_idle()
        if not self.stateful:
            return self._run_once(client, code, inputs)
        execution_id = code_execution_input.execution_id
        if not execution_id:
            raise ValueError(
                "a stateful MoatCodeExecutor needs CodeExecutionInput.execution_id "
                "(ADK's flow sets it to the session's id)"
            )
        return self._run_in_session(client, execution_id, code, inputs)

    # --- sessions ---

    def session_sandbox_id(self, execution_id: str) -> str | None:
        """The id of the sandbox that holds the state of session ``execution_id``, ``None``
        when it has none (not started, closed, or expired)."""
        with self._lock:
            session = self._sessions.get(execution_id)
        if session is None or session.dropped or session.sandbox is None:
            return None
        return session.sandbox.id

    def close_session(self, execution_id: str) -> None:
        """Ends session ``execution_id``: its sandbox is killed and its state gone (nothing
        when it has none). Its next call starts a fresh one."""
        with self._lock:
            session = self._sessions.pop(execution_id, None)
        if session is not None:
            self._drop(session)

    def close(self) -> None:
        """Kills the sandbox of every session and closes the connection to the server; the
        executor runs nothing after. Calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        failed: list[MoatError] = []
        for session in sessions:
            # Without waiting for a run in progress: ending it is the point.
            try:
                self._drop(session, quiet=False)
            except MoatError as e:
                failed.append(e)
        if self._client is not None:
            self._client.close()
        if failed:
            raise failed[0]

    def __enter__(self) -> MoatCodeExecutor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- inside ---

    def _open_client(self) -> Client:
        with self._lock:
            if self._closed or self._client is None:
                raise RuntimeError("this MoatCodeExecutor is closed")
            return self._client

    def _run_limit(self) -> int:
        """The longest a run may take, which its sandbox must outlive."""
        return self.timeout_seconds if self.timeout_seconds is not None else _common.MAX_RUN_SECONDS

    def _create(self, client: Client, execution_id: str | None) -> Sandbox:
        metadata = {"integration": "google-adk", **self.metadata}
        if execution_id is not None:
            metadata["adk-session"] = execution_id
        return Sandbox.create(
            self.template,
            timeout=self._run_limit() + _common.TTL_MARGIN,
            env=self.env or None,
            metadata=metadata,
            resources=Resources.coerce(self.resources),
            network=Network.coerce(self.network),
            client=client,
        )

    def _prepare(self, sandbox: Sandbox) -> tuple[CodeContext, str]:
        """Makes the working directory and an interpreter that runs in it."""
        entry = sandbox.files.make_dir(self.working_dir)
        context = sandbox.create_code_context(language="python", cwd=entry.path)
        return context, entry.path

    def _run_once(self, client: Client, code: str, inputs: list[tuple[str, bytes]]) -> CodeExecutionResult:
        sandbox = self._create(client, None)
        try:
            context, working_dir = self._prepare(sandbox)
            return self._run(sandbox, context, working_dir, code, inputs, look_before=False)
        finally:
            _kill(sandbox)

    def _run_in_session(
        self, client: Client, execution_id: str, code: str, inputs: list[tuple[str, bytes]]
    ) -> CodeExecutionResult:
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("this MoatCodeExecutor is closed")
                session = self._sessions.get(execution_id)
                if session is None:
                    session = self._sessions[execution_id] = _Session()
            with session.lock:
                # Closed or expired while this call waited: take the session's successor.
                if session.dropped:
                    continue
                self._ready(client, execution_id, session)
                sandbox, context = session.sandbox, session.context
                assert sandbox is not None and context is not None
                try:
                    return self._run(sandbox, context, session.working_dir, code, inputs, look_before=True)
                finally:
                    # The idle timeout counts from the end of the run.
                    session.last_used = time.monotonic()
                    if not session.dropped and not _extend(sandbox, self.idle_timeout):
                        session.sandbox = None

    def _ready(self, client: Client, execution_id: str, session: _Session) -> None:
        """Gives ``session`` (locked) a sandbox that will outlive the coming run: its own while
        it lives and has not been idle too long, else a fresh one."""
        if session.sandbox is not None:
            idle = time.monotonic() - session.last_used
            if idle > self.idle_timeout:
                logger.info("ADK session %s was idle %.0f s: its state is gone", execution_id, idle)
                _kill(session.sandbox)
                session.sandbox = None
            elif not _extend(session.sandbox, self._run_limit() + _common.TTL_MARGIN):
                logger.warning(
                    "the sandbox of ADK session %s has ended: starting a fresh one, without its state",
                    execution_id,
                )
                session.sandbox = None
        if session.sandbox is None:
            sandbox = self._create(client, execution_id)
            try:
                session.context, session.working_dir = self._prepare(sandbox)
            except BaseException:
                _kill(sandbox)
                raise
            session.sandbox = sandbox

    def _run(
        self,
        sandbox: Sandbox,
        context: CodeContext,
        working_dir: str,
        code: str,
        inputs: list[tuple[str, bytes]],
        *,
        look_before: bool,
    ) -> CodeExecutionResult:
        """Writes the inputs, runs the code, and collects what it printed and wrote."""
        for rel, data in inputs:
            sandbox.files.write(f"{working_dir}/{rel}", data)
        # A fresh working directory holds only the inputs: nothing to compare with.
        before = self._listing(sandbox, working_dir) if look_before else {}
        # Gathered as they come, so a run interrupted by its timeout still has its output.
        out = _Printed()
        err = _Printed()
        execution: Execution | None = None
        try:
            execution = sandbox.run_code(
                code,
                context=context,
                timeout=self.timeout_seconds,
                on_stdout=out.add,
                on_stderr=err.add,
            )
        except SandboxTimeoutError as e:
            # Only the executor's own deadline is a result; the server's 504 is a failure.
            if e.code != "timed_out" or self.timeout_seconds is None:
                raise
        # What a successful run printed on stderr goes to stdout: ADK takes any stderr for a failure.
        stdout = out.text() + err.text()
        if execution is None:
            stderr = f"Code execution timed out after {self.timeout_seconds} seconds and was interrupted.\n"
            exit_code: int | None = None
        else:
            stderr = _failure(execution)
            exit_code = 1 if stderr else 0
        outputs = self._outputs(sandbox, working_dir, before, {rel for rel, _ in inputs})
        extra: dict[str, Any] = {"exit_code": exit_code} if _RESULT_HAS_EXIT_CODE else {}
        return CodeExecutionResult(stdout=stdout, stderr=stderr, output_files=outputs, **extra)

    @staticmethod
    def _listing(sandbox: Sandbox, working_dir: str) -> dict[str, _common.Seen]:
        return _common.visible_files(working_dir, sandbox.files.list(working_dir, depth=_common.LIST_DEPTH))

    def _outputs(
        self,
        sandbox: Sandbox,
        working_dir: str,
        before: dict[str, _common.Seen],
        inputs: set[str],
    ) -> list[File]:
        """The files under ``working_dir`` that are new or changed since ``before``."""
        files: list[File] = []
        total = 0
        for rel, seen in self._listing(sandbox, working_dir).items():
            if rel in inputs or before.get(rel) == seen:
                continue
            if seen.size > _common.MAX_OUTPUT_FILE_BYTES:
                logger.warning("output file %s left out: %d bytes is over the limit", rel, seen.size)
                continue
            if len(files) == _common.MAX_OUTPUT_FILES or total + seen.size > _common.MAX_OUTPUT_TOTAL_BYTES:
                logger.warning("output file %s and any after it left out: the result holds enough", rel)
                break
            try:
                data = sandbox.files.read(f"{working_dir}/{rel}")
            except NotFoundError:
                # Removed since the listing (by code still stopping after a timeout).
                continue
            total += len(data)
            files.append(File(name=rel, content=data, mime_type=_common.mime_type(rel)))
        return files

    def _expire_idle(self) -> None:
        """Forgets the sessions idle past ``idle_timeout`` (the server has ended their
        sandboxes by then; they are killed again in case its clock ran behind)."""
        now = time.monotonic()
        with self._lock:
            stale = [
                (execution_id, s)
                for execution_id, s in self._sessions.items()
                if s.sandbox is not None and now - s.last_used > self.idle_timeout
            ]
        for execution_id, session in stale:
            # A session in use is not idle; its own call deals with it.
            if not session.lock.acquire(blocking=False):
                continue
            try:
                if session.dropped or time.monotonic() - session.last_used <= self.idle_timeout:
                    continue
                with self._lock:
                    if self._sessions.get(execution_id) is session:
                        del self._sessions[execution_id]
                self._drop(session)
            finally:
                session.lock.release()

    @staticmethod
    def _drop(session: _Session, *, quiet: bool = True) -> None:
        """Marks ``session`` ended and kills its sandbox; a failure to kill is logged, or
        raised when not ``quiet``."""
        session.dropped = True
        sandbox, session.sandbox = session.sandbox, None
        if sandbox is None:
            return
        if quiet:
            _kill(sandbox)
            return
        try:
            sandbox.kill()
        except NotFoundError:
            pass


def _failure(execution: Execution) -> str:
    """What goes to ``stderr`` for ``execution``: the traceback of the exception that stopped
    it, nothing when it ran to its end."""
    error = execution.error
    if error is None:
        return ""
    if error.name == "SystemExit" and error.value.strip() in _CLEAN_EXITS:
        return ""
    return error.traceback or f"{error.name}: {error.value}\n"


def _extend(sandbox: Sandbox, seconds: float) -> bool:
    """Gives ``sandbox`` ``seconds`` more to live; ``False`` when it has ended already, or
    could not be reached (a run's result is worth more than its sandbox)."""
    # Through a copy: Sandbox.set_timeout keeps the server's answer as the object's info, and
    # that answer has no access token, which run_code needs.
    try:
        Sandbox(sandbox.last_info, sandbox.client).set_timeout(seconds)
    except (NotFoundError, ConflictError):
        return False
    except MoatError as e:
        # It may still run: let it go rather than leave it to its time to live.
        logger.warning("could not extend sandbox %s (a fresh one serves the next run): %s", sandbox.id, e)
        _kill(sandbox)
        return False
    return True


class _Printed:
    """What a run printed on one stream, kept up to ``MAX_PRINTED_CHARS`` and said when cut."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._kept = 0
        self._dropped = 0

    def add(self, text: str) -> None:
        room = _common.MAX_PRINTED_CHARS - self._kept
        if room > 0:
            part = text[:room]
            self._parts.append(part)
            self._kept += len(part)
        self._dropped += max(0, len(text) - max(room, 0))

    def text(self) -> str:
        joined = "".join(self._parts)
        if self._dropped:
            joined += f"\n[{self._dropped} more characters of output were dropped]\n"
        return joined


def _kill(sandbox: Sandbox) -> None:
    """Kills ``sandbox``, logging (not raising) a failure: its time to live ends it anyway."""
    try:
        sandbox.kill()
    except NotFoundError:
        pass
    except MoatError as e:
        logger.warning("could not kill sandbox %s (its time to live will end it): %s", sandbox.id, e)
