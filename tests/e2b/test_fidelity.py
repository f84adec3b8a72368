"""Details where moat answers as E2B does, through the unmodified SDKs: file metadata, symlinks,
watch events, files of unknown size, the `base` template's commands and the code interpreter's
results and contexts."""

import time

import pytest
from e2b import CommandExitException, FileType, FilesystemEventType, Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox


@pytest.fixture(scope="module")
def sbx():
    sandbox = Sandbox.create()
    yield sandbox
    sandbox.kill()


@pytest.fixture(scope="module")
def code():
    sandbox = CodeSandbox.create()
    yield sandbox
    sandbox.kill()


def test_write_metadata_is_stored_and_returned(sbx):
    for path in ("/home/user/meta.txt", "/tmp/meta.txt"):
        info = sbx.files.write(path, "x", metadata={"owner": "alice", "Purpose": "test run"})
        expected = {"owner": "alice", "purpose": "test run"}
        assert info.metadata == expected, path
        assert sbx.files.get_info(path).metadata == expected, path
        listed = [e for e in sbx.files.list(path.rsplit("/", 1)[0]) if e.path == path]
        assert [e.metadata for e in listed] == [expected], path
        # A write without metadata clears it.
        assert sbx.files.write(path, "y").metadata is None
        assert sbx.files.get_info(path).metadata is None


def test_symlinks_report_the_targets_type_and_absolute_target(sbx):
    sbx.files.write("/home/user/ln/target.txt", "abc")
    sbx.files.make_dir("/home/user/ln/dir")
    sbx.commands.run("cd /home/user/ln && ln -s target.txt file-link && ln -s dir dir-link")
    info = sbx.files.get_info("/home/user/ln/file-link")
    assert info.type == FileType.FILE
    assert info.symlink_target == "/home/user/ln/target.txt"
    info = sbx.files.get_info("/home/user/ln/dir-link")
    assert info.type == FileType.DIR
    assert info.symlink_target == "/home/user/ln/dir"
    listed = {e.name: (e.type, e.symlink_target) for e in sbx.files.list("/home/user/ln")}
    assert listed == {
        "target.txt": (FileType.FILE, None),
        "dir": (FileType.DIR, None),
        "file-link": (FileType.FILE, "/home/user/ln/target.txt"),
        "dir-link": (FileType.DIR, "/home/user/ln/dir"),
    }


def test_one_write_of_a_new_file_is_three_events(sbx):
    sbx.files.make_dir("/home/user/watched")
    handle = sbx.files.watch_dir("/home/user/watched")
    try:
        sbx.files.write("/home/user/watched/new.txt", "hello")
        # Events arrive in order: once the marker's are in, all of new.txt's are.
        sbx.files.write("/home/user/watched/marker", "m")
        events = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e.name == "marker" for e in events):
            events += handle.get_new_events()
            time.sleep(0.05)
        assert any(e.name == "marker" for e in events), events
        kinds = [e.type for e in events if e.name == "new.txt"]
        assert kinds == [
            FilesystemEventType.CREATE,
            FilesystemEventType.CHMOD,
            FilesystemEventType.WRITE,
        ], events
    finally:
        handle.stop()


def test_files_of_unknown_size_are_read_to_the_end(sbx):
    path = "/proc/sys/kernel/random/boot_id"
    expected = sbx.commands.run(f"cat {path}").stdout
    assert len(expected) == 37
    assert sbx.files.read(path) == expected


def test_base_has_python_and_sudo(sbx):
    assert sbx.commands.run("python -c 'print(6 * 7)'").stdout == "42\n"
    assert sbx.commands.run("command -v python sudo").stdout == (
        "/usr/local/bin/python\n/usr/local/bin/sudo\n"
    )
    # Root runs the command as it is, options and environment kept.
    assert sbx.commands.run("sudo id -u", user="root").stdout == "0\n"
    out = sbx.commands.run("sudo -E -u root sh -c 'echo $MARK'", user="root", envs={"MARK": "m"})
    assert out.stdout == "m\n"
    # Another user cannot become root from inside: a clear refusal, not "command not found".
    with pytest.raises(CommandExitException) as err:
        sbx.commands.run("sudo id -u")
    assert err.value.exit_code == 1
    assert "cannot become root inside a moat sandbox" in err.value.stderr
    assert 'user="root"' in err.value.stderr


def test_string_results_lose_one_pair_of_quotes(code):
    assert code.run_code("'abc'").text == "abc"
    assert code.run_code('"it\'s"').text == "it's"
    assert code.run_code("42").text == "42"


def test_default_contexts_are_listed(code):
    contexts = code.list_code_contexts()
    by_language = {c.language: c for c in contexts}
    assert set(by_language) >= {"python", "javascript"}, contexts
    assert by_language["python"].cwd == "/home/user"
    assert by_language["javascript"].cwd == "/home/user"
    # The listed python context is the one run_code uses by default.
    code.run_code("marker = 7")
    assert code.run_code("marker", context=by_language["python"]).text == "7"


def test_a_context_in_a_directory_the_user_cannot_enter_is_a_clear_4xx(code):
    with pytest.raises(Exception) as err:
        code.create_code_context(language="python", cwd="/root")
    text = str(err.value)
    assert text.startswith("400"), text
    assert "/root" in text and "permission denied" in text.lower(), text
