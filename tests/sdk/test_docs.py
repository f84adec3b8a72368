"""The Python examples of the README and docs/API.md, run as written against the server the
suite is given (MOAT_URL, MOAT_API_KEY)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def block_after(path: pathlib.Path, marker: str) -> str:
    """The first ```python block after `marker` in `path`."""
    text = path.read_text()
    at = text.index(marker)
    found = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert found, f"no python block after {marker!r} in {path}"
    return found.group(1)


def run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs>", "exec"), {})
    return out.getvalue()


def test_the_readme_quickstart_runs_as_written() -> None:
    printed = run(block_after(ROOT / "README.md", "<!-- docs-test: python-quickstart -->"))
    assert printed == "hello\n2\n", printed


def test_the_api_reference_example_runs_as_written(tmp_path: pathlib.Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    code = block_after(ROOT / "docs/API.md", "### Python SDK")
    # The local project it uploads; `make test` in the sandbox has nothing to build, and its
    # failure is only streamed, as the example does with any command.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print(1)\n")
    monkeypatch.chdir(tmp_path)
    printed = run(code)
    assert "42\n" in printed and printed.rstrip().endswith("42"), printed


def test_the_quickstart_example_runs() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "exec: Linux | to-stderr | exit 3", out.stdout
    assert lines[1:] == ["run_code: 42", "one-shot: 45", "job: succeeded from a job"], out.stdout
