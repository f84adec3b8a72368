"""Templates, warm pools and builds through the SDK, sync and async.

Templates from an image and builds start from `MOAT_TEST_IMAGE`, a busybox image that
`crates/moat/tests/python_sdk.rs` pushes to a registry on loopback.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

import moat


@pytest.fixture
def image() -> str:
    ref = os.environ.get("MOAT_TEST_IMAGE")
    if not ref:
        pytest.skip("MOAT_TEST_IMAGE unset: python_sdk.rs pushes a test image and sets it")
    return ref


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_host_template_and_its_warm_pool(client: moat.Client, tag: str) -> None:
    name = _name("pool")
    t = client.templates.create(
        name,
        resources={"memory": "128M", "cpus": 0.25},
        max_resources=moat.Resources(memory="512M"),
        env={"FROM_TEMPLATE": "yes"},
        workdir="/tmp",
        timeout=120,
        pool_size=1,
        network=False,
    )
    try:
        assert t.name == name and not t.builtin
        assert t.spec.rootfs == "host" and t.spec.pool_size == 1 and t.spec.timeout_secs == 120
        assert t.spec.resources == moat.Resources(memory="128M", cpus=0.25)
        assert t.spec.max_resources == moat.Resources(memory="512M")
        assert t.spec.env == {"FROM_TEMPLATE": "yes"} and t.spec.workdir == "/tmp"
        assert name in [x.name for x in client.templates.list()]
        builtin = {x.name: x for x in client.templates.list() if x.builtin}
        assert "host" in builtin and "code-interpreter-v1" in builtin

        deadline = time.monotonic() + 30
        while client.templates.get(name).pool.ready < 1:
            assert time.monotonic() < deadline, "the warm pool never filled"
            time.sleep(0.2)
        assert client.templates.get(name).pool.target == 1
        sbx = moat.Sandbox.create(name, client=client, metadata={"test": tag})
        try:
            assert sbx.exec("echo $FROM_TEMPLATE; pwd").stdout == "yes\n/tmp\n"
            assert sbx.last_info.resources.memory_bytes == 128 << 20
            with pytest.raises(moat.InvalidRequestError):
                moat.Sandbox.create(name, client=client, resources={"memory": "1G"})
            with pytest.raises(moat.ConflictError):
                client.templates.delete(name)
            client.templates.delete(name, force=True)
            # The sandbox keeps running.
            assert sbx.exec("true").ok
        finally:
            sbx.kill()
    finally:
        try:
            client.templates.delete(name, force=True)
        except moat.NotFoundError:
            pass
    with pytest.raises(moat.NotFoundError):
        client.templates.get(name)

    spec = moat.TemplateSpec(env={"K": "v"}, user="root")
    other = client.templates.create(_name("spec"), spec)
    assert other.spec.user == "root" and other.spec.env == {"K": "v"}
    client.templates.delete(other.name)


def test_template_refusals(client: moat.Client) -> None:
    with pytest.raises(ValueError, match="not both"):
        client.templates.create("x", moat.TemplateSpec(), pool_size=1)
    with pytest.raises(ValueError, match="rootfs"):
        client.templates.create("x", rootfs="busybox")
    with pytest.raises(moat.InvalidRequestError):
        client.templates.create("Bad Name!")
    with pytest.raises(moat.InvalidRequestError):
        client.templates.create("x", {"rootfs": "host", "surprise": 1})
    with pytest.raises(moat.ConflictError):
        client.templates.create("host")
    with pytest.raises(moat.NotFoundError):
        client.templates.delete("no-such-template")


def test_template_from_an_image(client: moat.Client, image: str, tag: str) -> None:
    name = _name("img")
    events: list[moat.PullEvent] = []
    t = client.templates.create(name, image=image, on_progress=events.append)
    try:
        assert t.spec.image is not None and t.spec.image.startswith(image + "@sha256:")
        # The pull's steps, unless an earlier test of this server pulled the image already.
        kinds = [e.type for e in events]
        assert kinds == [] or (kinds[0] == "resolved" and kinds[-1] == "unpacked"), kinds
        # A second template of the image pulls nothing, with or without a progress callback.
        again = client.templates.create(_name("img"), image=image)
        client.templates.delete(again.name)
        with moat.Sandbox.create(name, client=client, metadata={"test": tag}) as sbx:
            assert sbx.exec("cat /etc/passwd | grep ^user:; echo $PATH").stdout.endswith("/bin\n")
    finally:
        client.templates.delete(name, force=True)
    with pytest.raises(moat.NotFoundError):
        client.templates.create(_name("img"), image=image.rsplit(":", 1)[0] + ":no-such-tag")


def _context(root: Path) -> Path:
    ctx = root / "ctx"
    (ctx / "app").mkdir(parents=True)
    (ctx / "app" / "hello.txt").write_text("hello from the context\n")
    (ctx / "secret.txt").write_text("left out\n")
    (ctx / ".dockerignore").write_text("secret.txt\n")
    return ctx


def test_builds(client: moat.Client, image: str, tmp_path: Path, tag: str) -> None:
    ctx = _context(tmp_path)
    digest = client.builds.upload_context(ctx)
    assert digest.startswith("sha256:") and client.builds.upload_context(ctx) == digest
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "named.txt").write_text("from a named context\n")
    dockerfile = (
        "ARG BASE\n"
        "FROM ${BASE}\n"
        "ARG WHO=nobody\n"
        "WORKDIR /srv\n"
        "COPY app/ /srv/\n"
        "COPY --from=extra named.txt /srv/\n"
        'RUN echo "built by $WHO" > /srv/built.txt && ls /srv > /srv/listing.txt\n'
        "ENV GREETING=hi\n"
    )
    (ctx / "Dockerfile").write_text(dockerfile)
    name = _name("built")
    build = client.builds.create(
        name, ctx, args={"BASE": image, "WHO": "sdk"}, contexts={"extra": extra}
    )
    assert build.status in ("queued", "running") and build.template == name and not build.is_final
    logs: list[str] = []
    done = client.builds.wait(build.id, on_log=logs.append, timeout=50)
    assert done.status == "succeeded", "".join(logs)
    assert done.is_final and done.steps == done.steps_done >= 5 and done.image
    assert "RUN" in "".join(logs)
    assert client.builds.get(build.id) == done
    assert build.id in [b.id for b in client.builds.list()]
    whole = client.builds.logs(build.id)
    assert whole.done and whole.text == "".join(logs)
    assert client.builds.logs(build.id, offset=whole.next_offset).text == ""

    template = client.templates.get(name)
    assert template.spec.rootfs == {"build": done.image}
    with moat.Sandbox.create(name, client=client, metadata={"test": tag}) as sbx:
        r = sbx.exec("cat hello.txt named.txt built.txt listing.txt; echo $GREETING; pwd")
        assert r.stdout == (
            "hello from the context\nfrom a named context\nbuilt by sdk\n"
            "built.txt\nhello.txt\nlisting.txt\nnamed.txt\nhi\n/srv\n"
        )
        assert not sbx.files.exists("/srv/secret.txt")

    # The same Dockerfile again reuses every step.
    cached = client.builds.wait(
        client.builds.create(
            name, ctx, args={"BASE": image, "WHO": "sdk"}, contexts={"extra": extra}
        ).id,
        timeout=50,
    )
    assert cached.status == "succeeded" and cached.steps_cached > 0 and cached.image == done.image

    # A build may write tags of the name; a tag is copied without a build.
    tagged = client.builds.wait(
        client.builds.create(
            f"{name}:v1",
            ctx,
            args={"BASE": image, "WHO": "sdk"},
            contexts={"extra": extra},
            tags="stable",
        ).id,
        timeout=50,
    )
    assert tagged.status == "succeeded" and tagged.tags == ["stable"], tagged
    assert client.templates.get(f"{name}:stable").build_id == tagged.id
    assert client.templates.get(name).build_id == cached.id
    written = client.templates.tag(f"{name}:v1", ["prod"])
    assert [(t.name, t.build_id) for t in written] == [(f"{name}:prod", tagged.id)]
    for t in ("v1", "stable", "prod"):
        client.templates.delete(f"{name}:{t}")
    client.builds.delete(build.id)
    with pytest.raises(moat.NotFoundError):
        client.builds.get(build.id)
    client.templates.delete(name, force=True)


def test_failed_cancelled_and_refused_builds(
    client: moat.Client, image: str, tmp_path: Path, user_key: moat.CreatedKey
) -> None:
    failing = client.builds.create(
        _name("fail"), dockerfile=f"FROM {image}\nRUN echo about to fail; false\n"
    )
    failed = client.builds.wait(failing.id, timeout=50)
    assert failed.status == "failed" and failed.error and "line 2" in failed.error
    assert "about to fail" in client.builds.logs(failing.id).text

    slow = client.builds.create(_name("slow"), dockerfile=f"FROM {image}\nRUN sleep 30\n")
    cancelled = client.builds.cancel(slow.id)
    assert cancelled.id == slow.id
    assert client.builds.wait(slow.id, timeout=30).status == "cancelled"

    path = tmp_path / "Dockerfile.custom"
    path.write_text(f"FROM {image}\nRUN --mount=type=cache,target=/x true\n")
    with pytest.raises(moat.InvalidRequestError):
        client.builds.create(_name("bad"), dockerfile_path=path)
    with pytest.raises(ValueError, match="Dockerfile"):
        client.builds.create(_name("none"))
    with pytest.raises(ValueError, match="not both"):
        client.builds.create(_name("both"), dockerfile="FROM scratch", dockerfile_path=path)
    # A built-in template's name is taken (for a user key: an admin's build would replace it).
    with moat.Client(api_key=user_key.secret) as uc, pytest.raises(moat.ConflictError):
        uc.builds.create("host", dockerfile="FROM scratch\n")
    with pytest.raises(moat.SandboxTimeoutError):
        slow2 = client.builds.create(_name("slow"), dockerfile=f"FROM {image}\nRUN sleep 20\n")
        try:
            client.builds.wait(slow2.id, timeout=1)
        finally:
            client.builds.cancel(slow2.id)


@pytest.mark.asyncio
async def test_async_templates_and_builds(
    aclient: moat.AsyncClient, image: str, tmp_path: Path
) -> None:
    name = _name("async")
    seen: list[str] = []

    async def progress(e: moat.PullEvent) -> None:
        seen.append(e.type)

    t = await aclient.templates.create(name, image=image, on_progress=progress, env={"A": "1"})
    assert t.spec.env["A"] == "1"
    assert (await aclient.templates.get(name)).name == name
    assert name in [x.name for x in await aclient.templates.list()]
    await aclient.templates.delete(name)

    ctx = _context(tmp_path)
    digest = await aclient.builds.upload_context(ctx)
    assert digest.startswith("sha256:")
    # The same tree gives the same archive, which the server has now.
    assert await aclient.builds.upload_context(ctx) == digest
    built = _name("abuilt")
    b = await aclient.builds.create(
        built, ctx, dockerfile=f"FROM {image}\nCOPY app/hello.txt /h.txt\n"
    )
    logs: list[str] = []

    async def on_log(text: str) -> None:
        logs.append(text)

    done = await aclient.builds.wait(b.id, timeout=50, on_log=on_log)
    assert done.status == "succeeded" and logs
    assert (await aclient.builds.get(b.id)).status == "succeeded"
    assert b.id in [x.id for x in await aclient.builds.list()]
    assert (await aclient.builds.logs(b.id)).done
    async with await moat.AsyncSandbox.create(built, client=aclient) as sbx:
        assert (await sbx.files.read_text("/h.txt")) == "hello from the context\n"
    await aclient.builds.delete(b.id)
    slow = await aclient.builds.create(_name("aslow"), dockerfile=f"FROM {image}\nRUN sleep 30\n")
    await aclient.builds.cancel(slow.id)
    assert (await aclient.builds.wait(slow.id, timeout=30)).status == "cancelled"
    await aclient.templates.delete(built, force=True)
