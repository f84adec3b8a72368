"""Jobs through the SDK: submit with inputs of every kind, wait, logs, outputs, listings,
cancel, delete, blobs and idempotency, sync and async."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest

import moat


def test_code_with_inputs_and_outputs(client: moat.Client, tmp_path: Path) -> None:
    local = tmp_path / "numbers.txt"
    local.write_text("1\n2\n3\n")
    progress: list[tuple[int, int | None]] = []
    blob = client.jobs.upload_blob(local, on_progress=lambda d, t: progress.append((d, t)))
    assert blob.digest.startswith("sha256:") and blob.size == 6 and progress[-1] == (6, 6)
    code = (
        "import os\n"
        "total = sum(int(x) for x in open('numbers.txt'))\n"
        "extra = len(open('note.txt').read()) + len(open('raw.bin', 'rb').read())\n"
        "open('out/sum.txt', 'w').write(str(total + extra))\n"
        "open('out/env.txt', 'w').write(os.environ['MODE'])\n"
        "print('stdout line'); import sys; print('stderr line', file=sys.stderr)\n"
    )
    job = client.jobs.submit(
        code,
        inputs=[
            moat.JobInput("numbers.txt", blob=blob.digest),
            moat.JobInput("note.txt", content="four"),
            moat.JobInput("raw.bin", content=b"\x00\x01"),
            moat.JobInput("out/.keep", content=""),
        ],
        outputs=["out/*.txt", "nothing-*.txt"],
        env={"MODE": "batch"},
        timeout=60,
    )
    assert job.state in ("queued", "running") and not job.is_final and job.max_attempts == 1
    done = client.jobs.wait(job.id, timeout=50)
    assert done.state == "succeeded" and done.exit_code == 0 and done.is_final, done
    assert done.stdout_tail == "stdout line\n" and done.stderr_tail == "stderr line\n"
    assert sorted(o.path for o in done.outputs) == [
        "/home/user/out/env.txt",
        "/home/user/out/sum.txt",
    ]
    assert any("nothing-*.txt" in e for e in done.output_errors)
    assert client.jobs.logs(job.id) == b"stdout line\n"
    assert client.jobs.logs(job.id, "stderr") == b"stderr line\n"
    assert client.jobs.read_output(job.id, "/home/user/out/sum.txt") == b"12"

    seen: list[int] = []
    path = client.jobs.download_output(
        job.id,
        "/home/user/out/env.txt",
        tmp_path / "env.txt",
        on_progress=lambda d, t: seen.append(d),
    )
    assert path.read_text() == "batch" and seen[-1] == 5
    written = client.jobs.download_outputs(done, tmp_path / "outs")
    assert sorted(p.relative_to(tmp_path / "outs").as_posix() for p in written) == [
        "home/user/out/env.txt",
        "home/user/out/sum.txt",
    ]
    assert (tmp_path / "outs/home/user/out/sum.txt").read_text() == "12"

    # An output of one job is the input of the next.
    chained = client.jobs.submit(
        shell="cat sum.txt",
        inputs=[moat.JobInput("sum.txt", job_output=(job.id, "/home/user/out/sum.txt"))],
    )
    assert client.jobs.wait(chained.id, timeout=50).stdout_tail == "12"

    with pytest.raises(moat.NotFoundError):
        client.jobs.read_output(job.id, "/home/user/out/none.txt")
    client.jobs.delete_blob(blob.digest)
    client.jobs.delete(job.id)
    with pytest.raises(moat.NotFoundError):
        client.jobs.get(job.id)


def test_commands_failures_retries_and_cancel(client: moat.Client) -> None:
    failing = client.jobs.submit(
        cmd=["sh", "-c", "echo try >&2; exit 3"], retries=1, template="host"
    )
    failed = client.jobs.wait(failing.id, timeout=50)
    assert (
        failed.state == "failed"
        and failed.exit_code == 3
        and failed.attempts == 2 == failed.max_attempts
    )

    timed = client.jobs.wait(client.jobs.submit(shell="sleep 30", timeout=1).id, timeout=50)
    assert timed.state == "timed_out"

    slow = client.jobs.submit(shell="sleep 60")
    assert client.jobs.cancel(slow.id).state == "cancelled"
    assert client.jobs.get(slow.id).state == "cancelled"
    with pytest.raises(moat.ConflictError):
        client.jobs.cancel(slow.id)

    mine = {failing.id, slow.id}
    assert mine <= {j.id for j in client.jobs.list()}
    assert [j.id for j in client.jobs.list(state="cancelled") if j.id in mine] == [slow.id]
    assert {j.id for j in client.jobs.list(state=["failed", "cancelled"])} >= mine
    newest = client.jobs.list(limit=1)
    assert len(newest) == 1 and newest[0].id == slow.id  # newest first
    with pytest.raises(ValueError, match="state"):
        client.jobs.list(state="done")

    code = client.jobs.submit("echo from bash", language="bash")
    assert client.jobs.wait(code.id, timeout=50).stdout_tail == "from bash\n"


def test_idempotency_and_blobs(client: moat.Client) -> None:
    key = uuid.uuid4().hex
    first = client.jobs.submit(shell="echo once", idempotency_key=key)
    again = client.jobs.submit(shell="echo once", idempotency_key=key)
    assert again.id == first.id and first.idempotency_key == key
    with pytest.raises(moat.ConflictError):
        client.jobs.submit(shell="echo other", idempotency_key=key)
    client.jobs.wait(first.id, timeout=50)

    blob = client.jobs.upload_blob(io.BytesIO(b"from a file object"))
    same = client.jobs.upload_blob(b"from a file object")
    assert same.digest == blob.digest
    client.jobs.delete_blob(blob.digest)


def test_refusals(client: moat.Client) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        client.jobs.submit()
    with pytest.raises(ValueError, match="exactly one"):
        client.jobs.submit("print(1)", shell="true")
    with pytest.raises(TypeError, match="argv"):
        client.jobs.submit(cmd="echo hi")
    with pytest.raises(ValueError, match="exactly one"):
        moat.JobInput("x")
    with pytest.raises(ValueError, match="retries"):
        client.jobs.submit(shell="true", retries=11)
    with pytest.raises(TypeError, match="outputs"):
        client.jobs.submit(shell="true", outputs="out.txt")  # type: ignore[arg-type]
    with pytest.raises(moat.InvalidRequestError):
        client.jobs.submit("print(1)", language="cobol")
    with pytest.raises(moat.NotFoundError):
        client.jobs.get("job-" + "a" * 20)
    with pytest.raises(moat.SandboxTimeoutError):
        slow = client.jobs.submit(shell="sleep 20")
        try:
            client.jobs.wait(slow.id, timeout=1, poll_interval=0.2)
        finally:
            client.jobs.cancel(slow.id)


@pytest.mark.asyncio
async def test_async_jobs(aclient: moat.AsyncClient, tmp_path: Path) -> None:
    blob = await aclient.jobs.upload_blob(b"async input")
    job = await aclient.jobs.submit(
        shell="mkdir -p out && tr a-z A-Z < in.txt > out/up.txt && cat out/up.txt",
        inputs={"in.txt": "async input", "other.bin": b"\x00"},
        outputs=["out/up.txt"],
    )
    done = await aclient.jobs.wait(job.id, timeout=50)
    assert done.state == "succeeded" and done.stdout_tail == "ASYNC INPUT"
    assert (await aclient.jobs.get(job.id)).state == "succeeded"
    assert await aclient.jobs.logs(job.id) == b"ASYNC INPUT"
    assert await aclient.jobs.read_output(job.id, "/home/user/out/up.txt") == b"ASYNC INPUT"
    p = await aclient.jobs.download_output(job.id, "/home/user/out/up.txt", tmp_path / "up.txt")
    assert p.read_text() == "ASYNC INPUT"
    assert len(await aclient.jobs.download_outputs(job.id, tmp_path / "all")) == 1
    assert job.id in {j.id for j in await aclient.jobs.list(state="succeeded")}
    slow = await aclient.jobs.submit(shell="sleep 60")
    assert (await aclient.jobs.cancel(slow.id)).state == "cancelled"
    await aclient.jobs.delete(slow.id)
    await aclient.jobs.delete(job.id)
    await aclient.jobs.delete_blob(blob.digest)
    with pytest.raises(moat.NotFoundError):
        await aclient.jobs.get(job.id)
