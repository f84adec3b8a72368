"""The E2B documentation's quickstarts, as written there, against moat serve (only the three
environment variables point them here)."""

from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeInterpreterSandbox


def test_code_interpreter_quickstart():
    sbx = CodeInterpreterSandbox.create()
    execution = sbx.run_code("print('hello world')")
    print(execution.logs)
    assert execution.logs.stdout == ["hello world\n"]
    files = sbx.files.list("/")
    print(files)
    assert {"home", "tmp", "usr"} <= {f.name for f in files}
    sbx.kill()


def test_sandbox_quickstart():
    sandbox = Sandbox.create()
    result = sandbox.commands.run('echo "Hello from E2B Sandbox!"')
    print(result.stdout)
    assert result.stdout == "Hello from E2B Sandbox!\n"
    sandbox.files.write("/home/user/hello.txt", "Hello, World!")
    assert sandbox.files.read("/home/user/hello.txt") == "Hello, World!"
    sandbox.kill()
