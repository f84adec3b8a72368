"""E2B's `Template.build`, unmodified, against moat serve: the SDK's builder steps become a moat
build, its COPY files travel through the upload links moat hands out, and `Sandbox.create`
starts the template it made.

The base image is `MOAT_TEST_IMAGE`, a busybox image in a registry on loopback that
`crates/moat/tests/e2b_sdk.rs` pushes before it runs this file.
"""

import os

import pytest
from e2b import BuildException, Sandbox, SandboxException, Template, TemplateException

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


def _version(name):
    sbx = Sandbox.create(name)
    try:
        return sbx.commands.run("cat /home/user/version").stdout.strip()
    finally:
        sbx.kill()


def test_tags_name_builds_and_move_between_them():
    def version(text):
        return Template().from_image(IMAGE).run_cmd(f"echo {text} > /home/user/version")

    one = Template.build(version("one"), "sdk-tagged:v1")
    # A build with a tag writes that tag only: the name alone (`default`) is not there.
    assert Template.exists("sdk-tagged")
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.create("sdk-tagged")
    two = Template.build(version("two"), "sdk-tagged", tags=["v2", "latest"])
    assert one.build_id != two.build_id
    assert _version("sdk-tagged:v1") == "one"
    assert _version("SDK-Tagged:Latest") == "two"
    # A build's id names what it made.
    assert _version(f"sdk-tagged:{one.build_id}") == "one"

    # Tags move without a build; `default` is the name alone.
    assigned = Template.assign_tags("sdk-tagged:v1", ["prod", "default"])
    assert str(assigned.build_id) == one.build_id
    assert _version("sdk-tagged") == "one"
    assert _version("sdk-tagged:prod") == "one"
    tags = {t.tag: str(t.build_id) for t in Template.get_tags("sdk-tagged")}
    assert tags == {
        "default": one.build_id,
        "v1": one.build_id,
        "prod": one.build_id,
        "v2": two.build_id,
        "latest": two.build_id,
    }, tags
    Template.assign_tags("sdk-tagged:v2", "prod")
    assert _version("sdk-tagged:prod") == "two"

    Template.remove_tags("sdk-tagged", ["prod", "latest"])
    assert {t.tag for t in Template.get_tags("sdk-tagged")} == {"default", "v1", "v2"}
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.create("sdk-tagged:prod")
    # What cannot be done is refused and changes nothing.
    with pytest.raises(TemplateException, match="not found"):
        Template.remove_tags("sdk-tagged", ["v2", "never"])
    with pytest.raises(TemplateException, match="itself"):
        Template.remove_tags("sdk-tagged", "default")
    with pytest.raises(TemplateException, match="built-in"):
        Template.assign_tags("base", "mine")
    with pytest.raises(BuildException, match="template name"):
        Template.build(version("bad"), "sdk-tagged", tags=["not valid"])
    assert {t.tag for t in Template.get_tags("sdk-tagged")} == {"default", "v1", "v2"}


def test_what_moat_cannot_build_is_refused_before_it_runs():
    # `base` is the host's own files, not an image.
    with pytest.raises(BuildException) as e:
        Template.build(Template().from_template("base").run_cmd("true"), alias="from-base")
    assert "not an image" in str(e.value), e.value
