"""Jobs (``client.jobs``): code or commands run later in fresh sandboxes, with inputs written
before and the files named in ``outputs`` kept after, until the job is deleted."""

from __future__ import annotations

import asyncio
import builtins
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from . import _args
from ._http import AsyncTransport, Op, SyncTransport, parse_json, parse_none, seg
from .errors import MoatError, SandboxTimeoutError
from .files import (
    ProgressCallback,
    _acall,
    _awith_progress,
    _length_headers,
    _source,
    _total,
    _with_progress,
)
from .models import JOB_STATES, Blob, Job, JobInput, Resources

__all__ = ["AsyncJobs", "Jobs"]

_CHUNK = 1 << 20
#: Most retries a job may have.
MAX_RETRIES = 10
#: Longest a job's attempt may run, seconds.
MAX_JOB_TIMEOUT = 86400

Inputs = Sequence[JobInput] | Mapping[str, "str | bytes"]


def _inputs(inputs: Inputs | None) -> list[dict[str, Any]]:
    if inputs is None:
        return []
    if isinstance(inputs, Mapping):
        return [JobInput(path=str(p), content=c).to_json() for p, c in inputs.items()]
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
        raise TypeError("inputs must be a sequence of JobInput or a mapping of paths to contents")
    out = []
    for i in inputs:
        if not isinstance(i, JobInput):
            raise TypeError(f"each input must be a moat.JobInput, not {type(i).__name__}")
        out.append(i.to_json())
    return out


def _submit_op(
    code: str | None,
    cmd: Sequence[str] | None,
    shell: str | None,
    fields: dict[str, Any],
) -> Op[Job]:
    kind = _args.one_of(code=code, cmd=cmd, shell=shell)
    body: dict[str, Any] = {}
    if kind == "cmd":
        if isinstance(cmd, str):
            raise TypeError("cmd must be an argv (a sequence of str); give a script as shell=")
        assert cmd is not None
        body["cmd"] = _args.command(cmd)[1]
    else:
        value = code if kind == "code" else shell
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{kind} must be a non-empty string")
        body[kind] = value
    if _args.optional_str("language", fields["language"]) is not None:
        if kind != "code":
            raise ValueError("language goes with code=, not with cmd= or shell=")
        body["language"] = fields["language"]
    for name in ("template", "cwd", "idempotency_key", "webhook_url"):
        if _args.optional_str(name, fields[name]) is not None:
            body[name] = fields[name]
    inputs = _inputs(fields["inputs"])
    if inputs:
        body["inputs"] = inputs
    outputs = _args.str_list("outputs", fields["outputs"])
    if outputs:
        body["outputs"] = outputs
    env = _args.mapping("env", fields["env"])
    if env:
        body["env"] = env
    secs = _args.seconds("timeout", fields["timeout"], maximum=MAX_JOB_TIMEOUT)
    if secs is not None:
        body["timeout_secs"] = secs
    res = Resources.coerce(fields["resources"])
    if res is not None:
        body["resources"] = res.to_json()
    if _args.count("retries", fields["retries"], minimum=0, maximum=MAX_RETRIES) is not None:
        body["retries"] = fields["retries"]
    return Op("POST", "/v1/jobs", parse_json(Job.from_json), json=body, ok=(200, 202))


def _path(job_id: str, rest: str = "") -> str:
    return f"/v1/jobs/{seg(job_id)}{rest}"


def _list_op(
    state: str | Sequence[str] | None, after: str | None, page: int
) -> Op[tuple[list[Job], str | None]]:
    params = [("state", s) for s in _args.states("state", state, JOB_STATES)]
    if after is not None:
        params.append(("after", after))
    params.append(("limit", str(page)))

    def parse(j: Any) -> tuple[list[Job], str | None]:
        return [Job.from_json(x) for x in j["jobs"]], j.get("next")

    return Op("GET", "/v1/jobs", parse_json(parse), params=params)


def _page(limit: int | None) -> int:
    _args.count("limit", limit)
    return min(limit or 1000, 1000)


def _log_path(job_id: str, stream: str) -> str:
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be 'stdout' or 'stderr', not {stream!r}")
    return _path(job_id, f"/logs/{stream}")


def _output_params(path: str) -> list[tuple[str, str]]:
    if not isinstance(path, str) or not path:
        raise ValueError("an output's path must be a non-empty string")
    return [("path", path)]


def _blob_source(
    data: bytes | str | os.PathLike[str] | IO[bytes],
) -> tuple[Any, int | None, IO[bytes] | None]:
    """Chunks of a blob's bytes, their number, and a file to close afterwards."""
    if isinstance(data, (str, os.PathLike)):
        f = open(data, "rb")
        chunks, total = _source(f)
        return chunks, total, f
    chunks, total = _source(data)
    return chunks, total, None


def _local_under(root: Path, sandbox_path: str) -> Path:
    """Where an output at ``sandbox_path`` lands below ``root`` (its path kept, never above)."""
    parts = [p for p in sandbox_path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise MoatError(f"refusing the output path {sandbox_path!r}", code="unsafe_path")
    return root.joinpath(*parts)


def _wait_args(timeout: float | None, poll_interval: float) -> tuple[float | None, float]:
    _args.seconds("timeout", timeout)
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, (int, float))
        or poll_interval <= 0
    ):
        raise ValueError("poll_interval must be a positive number of seconds")
    return (None if timeout is None else time.monotonic() + timeout), float(poll_interval)


def _wait_timeout(job_id: str) -> SandboxTimeoutError:
    return SandboxTimeoutError(
        f"job {job_id} was not over within the time given", code="wait_timeout"
    )


class Jobs:
    """The key's tenant's jobs."""

    def __init__(self, transport: SyncTransport) -> None:
        self._t = transport

    def submit(
        self,
        code: str | None = None,
        *,
        cmd: Sequence[str] | None = None,
        shell: str | None = None,
        language: str | None = None,
        template: str | None = None,
        inputs: Inputs | None = None,
        outputs: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        retries: int | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
    ) -> Job:
        """Queues a job and returns it (recorded before the answer).

        Give exactly one of ``code`` (in ``language``: ``python``, the default, ``bash``,
        ``sh`` or ``javascript``), ``cmd`` (an argv) and ``shell`` (a ``/bin/sh -c`` script).
        ``inputs`` are files written first (:class:`~moat.models.JobInput`, or a mapping of
        paths to text or bytes); ``outputs`` paths or globs of files to keep. A second submit
        with the same ``idempotency_key`` returns the first job.
        """
        fields = dict(
            language=language,
            template=template,
            inputs=inputs,
            outputs=outputs,
            env=env,
            cwd=cwd,
            timeout=timeout,
            resources=resources,
            retries=retries,
            idempotency_key=idempotency_key,
            webhook_url=webhook_url,
        )
        return self._t.call(_submit_op(code, cmd, shell, fields))

    def get(self, job_id: str) -> Job:
        """The job ``job_id``."""
        return self._t.call(Op("GET", _path(job_id), parse_json(Job.from_json)))

    def list(
        self, *, state: str | Sequence[str] | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """The tenant's jobs, newest first: those in ``state`` (one or several), at most
        ``limit``."""
        out: builtins.list[Job] = []
        after: str | None = None
        while True:
            items, after = self._t.call(_list_op(state, after, _page(limit)))
            out.extend(items)
            if after is None or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    def cancel(self, job_id: str) -> Job:
        """Cancels a queued or running job (``ConflictError`` once it is over)."""
        return self._t.call(
            Op("POST", _path(job_id, "/cancel"), parse_json(Job.from_json), json={})
        )

    def delete(self, job_id: str) -> None:
        """Deletes the job and the files it kept (cancelling it first if it is not over)."""
        self._t.call(Op("DELETE", _path(job_id), parse_none, ok=(204,)))

    def logs(self, job_id: str, stream: str = "stdout") -> bytes:
        """The whole standard output (or, with ``stream="stderr"``, error) of the job's last
        attempt."""
        return self._t.call(Op("GET", _log_path(job_id, stream), lambda r: r.content))

    def read_output(self, job_id: str, path: str) -> bytes:
        """The bytes of a file the job kept (``path`` as ``Job.outputs`` lists it)."""
        return self._t.call(
            Op("GET", _path(job_id, "/output"), lambda r: r.content, params=_output_params(path))
        )

    def download_output(
        self,
        job_id: str,
        path: str,
        local_path: str | os.PathLike[str],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Copies a file the job kept to ``local_path`` (written beside it, then renamed)."""
        local = Path(local_path)
        tmp = local.with_name(f".{local.name}.moat-partial")
        try:
            with (
                self._t.stream("GET", _path(job_id, "/output"), params=_output_params(path)) as r,
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
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def download_outputs(
        self, job: Job | str, local_dir: str | os.PathLike[str]
    ) -> builtins.list[Path]:
        """Copies every file the job kept under ``local_dir``, each at its sandbox path below
        it (``/home/user/out.txt`` as ``local_dir/home/user/out.txt``); the files written."""
        if isinstance(job, str):
            job = self.get(job)
        root = Path(local_dir)
        written = []
        for output in job.outputs:
            target = _local_under(root, output.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(self.download_output(job.id, output.path, target))
        return written

    def upload_blob(
        self,
        data: bytes | str | os.PathLike[str] | IO[bytes],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Blob:
        """Stores a blob for job inputs (``JobInput(path, blob=blob.digest)``): bytes, a
        binary file object, or a local file's path."""
        chunks, total, f = _blob_source(data)
        try:
            return self._t.call(
                Op(
                    "POST",
                    "/v1/blobs",
                    parse_json(Blob.from_json),
                    content=_with_progress(chunks, total, on_progress),
                    headers=_length_headers(total),
                    ok=(200, 201),
                )
            )
        finally:
            if f is not None:
                f.close()

    def delete_blob(self, digest: str) -> None:
        """Deletes an uploaded blob (jobs that name it keep it until they go)."""
        self._t.call(Op("DELETE", f"/v1/blobs/{seg(digest)}", parse_none, ok=(204,)))

    def wait(self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.5) -> Job:
        """Waits until the job is over and returns it (in whatever final state: check
        ``state``). Past ``timeout`` seconds raises :class:`~moat.errors.SandboxTimeoutError`
        (the job goes on)."""
        deadline, interval = _wait_args(timeout, poll_interval)
        while True:
            job = self.get(job_id)
            if job.is_final:
                return job
            if deadline is not None and time.monotonic() + interval > deadline:
                raise _wait_timeout(job_id)
            time.sleep(interval)


class AsyncJobs:
    """The key's tenant's jobs (async)."""

    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport

    async def submit(
        self,
        code: str | None = None,
        *,
        cmd: Sequence[str] | None = None,
        shell: str | None = None,
        language: str | None = None,
        template: str | None = None,
        inputs: Inputs | None = None,
        outputs: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        resources: Resources | Mapping[str, Any] | None = None,
        retries: int | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
    ) -> Job:
        """Queues a job and returns it (see :meth:`Jobs.submit`)."""
        fields = dict(
            language=language,
            template=template,
            inputs=inputs,
            outputs=outputs,
            env=env,
            cwd=cwd,
            timeout=timeout,
            resources=resources,
            retries=retries,
            idempotency_key=idempotency_key,
            webhook_url=webhook_url,
        )
        return await self._t.call(_submit_op(code, cmd, shell, fields))

    async def get(self, job_id: str) -> Job:
        """The job ``job_id``."""
        return await self._t.call(Op("GET", _path(job_id), parse_json(Job.from_json)))

    async def list(
        self, *, state: str | Sequence[str] | None = None, limit: int | None = None
    ) -> builtins.list[Job]:
        """The tenant's jobs, newest first (see :meth:`Jobs.list`)."""
        out: builtins.list[Job] = []
        after: str | None = None
        while True:
            items, after = await self._t.call(_list_op(state, after, _page(limit)))
            out.extend(items)
            if after is None or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    async def cancel(self, job_id: str) -> Job:
        """Cancels a queued or running job."""
        return await self._t.call(
            Op("POST", _path(job_id, "/cancel"), parse_json(Job.from_json), json={})
        )

    async def delete(self, job_id: str) -> None:
        """Deletes the job and the files it kept."""
        await self._t.call(Op("DELETE", _path(job_id), parse_none, ok=(204,)))

    async def logs(self, job_id: str, stream: str = "stdout") -> bytes:
        """The whole standard output (or error) of the job's last attempt."""
        return await self._t.call(Op("GET", _log_path(job_id, stream), lambda r: r.content))

    async def read_output(self, job_id: str, path: str) -> bytes:
        """The bytes of a file the job kept."""
        return await self._t.call(
            Op("GET", _path(job_id, "/output"), lambda r: r.content, params=_output_params(path))
        )

    async def download_output(
        self,
        job_id: str,
        path: str,
        local_path: str | os.PathLike[str],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Path:
        """Copies a file the job kept to ``local_path``."""
        local = Path(local_path)
        tmp = local.with_name(f".{local.name}.moat-partial")
        try:
            async with self._t.stream(
                "GET", _path(job_id, "/output"), params=_output_params(path)
            ) as r:
                with open(tmp, "wb") as out:
                    total, done = _total(r), 0
                    await _acall(on_progress, 0, total)
                    async for chunk in r.aiter_bytes(_CHUNK):
                        await asyncio.to_thread(out.write, chunk)
                        done += len(chunk)
                        await _acall(on_progress, done, total)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    async def download_outputs(
        self, job: Job | str, local_dir: str | os.PathLike[str]
    ) -> builtins.list[Path]:
        """Copies every file the job kept under ``local_dir`` (see
        :meth:`Jobs.download_outputs`)."""
        if isinstance(job, str):
            job = await self.get(job)
        root = Path(local_dir)
        written = []
        for output in job.outputs:
            target = _local_under(root, output.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(await self.download_output(job.id, output.path, target))
        return written

    async def upload_blob(
        self,
        data: bytes | str | os.PathLike[str] | IO[bytes],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Blob:
        """Stores a blob for job inputs (see :meth:`Jobs.upload_blob`)."""
        chunks, total, f = _blob_source(data)
        try:
            return await self._t.call(
                Op(
                    "POST",
                    "/v1/blobs",
                    parse_json(Blob.from_json),
                    content=_awith_progress(chunks, total, on_progress),
                    headers=_length_headers(total),
                    ok=(200, 201),
                )
            )
        finally:
            if f is not None:
                f.close()

    async def delete_blob(self, digest: str) -> None:
        """Deletes an uploaded blob."""
        await self._t.call(Op("DELETE", f"/v1/blobs/{seg(digest)}", parse_none, ok=(204,)))

    async def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.5
    ) -> Job:
        """Waits until the job is over and returns it (see :meth:`Jobs.wait`)."""
        deadline, interval = _wait_args(timeout, poll_interval)
        while True:
            job = await self.get(job_id)
            if job.is_final:
                return job
            if deadline is not None and time.monotonic() + interval > deadline:
                raise _wait_timeout(job_id)
            await asyncio.sleep(interval)
