"""E2B's `Template.build`, unmodified, against moat serve: the SDK's builder steps become a moat
build, its COPY files travel through the upload links moat hands out, and `Sandbox.create`
starts the template it made.

The base image is `MOAT_TEST_IMAGE`, a busybox image in a registry on loopback that
`crates/moat/tests/e2b_sdk.rs` pushes before it runs this file.
"""

import os

import pytest
from e2b import BuildException, Sandbox, Template

IMAGE = os.environ.get("MOAT_TEST_IMAGE", "")


@pytest.fixture(autouse=True)
def _image(moat):
    if not IMAGE:
        pytest.fail("MOAT_TEST_IMAGE unset: run through `cargo nextest run -p moat --test e2b_sdk`")


def _template(context):
    return (
        Template(file_context_path=str(context))
        .from_image(IMAGE)
        .copy("app/", "/home/user/app/")
        .run_cmd("echo built as $(id -un) > /home/user/made")
        .run_cmd("echo root did this > /etc/by-root", user="root")
        .set_envs({"GREETING": "hi there", "QUOTED": 'a "b" $c'})
        .set_workdir("/home/user/app")
    )


def test_a_template_built_by_the_sdk_starts_sandboxes(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.txt").write_text("hello from the context\n")
    logs = []
    info = Template.build(
        _template(tmp_path),
        alias="sdk-built",
        cpu_count=1,
        memory_mb=512,
        on_build_logs=logs.append,
    )
    assert info.template_id == "sdk-built"
    text = "\n".join(entry.message for entry in logs)
    assert "RUN" in text and "built sha256:" in text, text
    assert Template.exists("sdk-built")
    assert not Template.exists("never-built")

    sbx = Sandbox.create("sdk-built")
    try:
        r = sbx.commands.run(
            'cat hello.txt /home/user/made /etc/by-root; echo "$GREETING|$QUOTED"; pwd'
        )
        assert r.stdout == (
            "hello from the context\nbuilt as user\nroot did this\n"
            'hi there|a "b" $c\n/home/user/app\n'
        ), r
    finally:
        sbx.kill()

    # The same template again: its files are there already and every step is reused.
    logs.clear()
    Template.build(_template(tmp_path), alias="sdk-built", on_build_logs=logs.append)
    text = "\n".join(entry.message for entry in logs)
    # WORKDIR /home/user, the COPY and the two RUNs make layers (the COPY made
    # /home/user/app, so its WORKDIR makes none).
    assert text.count("---> cached") == 4, text


def test_a_failing_step_fails_the_build_with_its_reason(tmp_path):
    template = Template().from_image(IMAGE).run_cmd("echo about to fail; exit 4")
    with pytest.raises(BuildException) as e:
        Template.build(template, alias="sdk-fails")
    assert "status 4" in str(e.value), e.value
    assert not Template.exists("sdk-fails")


def test_a_template_builds_on_another_one(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.txt").write_text("hello from the context\n")
    Template.build(_template(tmp_path), alias="sdk-lower")
    upper = Template().from_template("sdk-lower").run_cmd("echo on top > /home/user/upper")
    Template.build(upper, alias="sdk-upper")
    sbx = Sandbox.create("sdk-upper")
    try:
        r = sbx.commands.run("cat /home/user/made /home/user/upper; echo $GREETING")
        assert r.stdout == "built as user\non top\nhi there\n", r
    finally:
        sbx.kill()


def test_what_moat_cannot_build_is_refused_before_it_runs():
    # `base` is the host's own files, not an image.
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_template("base").run_cmd("true"), alias="from-base")
    assert "not an image" in str(e.value), e.value
