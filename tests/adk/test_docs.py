"""The ADK examples of the README and docs/API.md, run as written (they make agents; no model
is called)."""

from __future__ import annotations

import pathlib
import re

from google.adk.tools.environment import EnvironmentToolset

from moat.integrations.adk import MoatCodeExecutor, MoatEnvironment

ROOT = pathlib.Path(__file__).resolve().parents[2]


def block_after(path: pathlib.Path, marker: str) -> str:
    text = path.read_text()
    at = text.index(marker)
    found = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert found, f"no python block after {marker!r} in {path}"
    return found.group(1)


def test_the_readme_agent_is_made_as_written() -> None:
    scope: dict[str, object] = {}
    exec(block_after(ROOT / "README.md", "<!-- docs-test: adk-executor -->"), scope)
    executor = scope["agent"].code_executor  # type: ignore[attr-defined]
    assert isinstance(executor, MoatCodeExecutor) and executor.stateful


def test_the_api_reference_agents_are_made_as_written() -> None:
    scope: dict[str, object] = {}
    exec(block_after(ROOT / "docs/API.md", "### Google ADK"), scope)
    assert isinstance(scope["analyst"].code_executor, MoatCodeExecutor)  # type: ignore[attr-defined]
    toolset = scope["coder"].tools[0]  # type: ignore[attr-defined]
    assert isinstance(toolset, EnvironmentToolset)
    assert isinstance(toolset._environment, MoatEnvironment) or any(  # noqa: SLF001
        isinstance(v, MoatEnvironment) for v in vars(toolset).values()
    )


def test_the_agent_example_runs_up_to_the_model_call() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples/adk_agent.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "executor: 45 | stderr: ''",
        "no model key (GOOGLE_API_KEY): stopping before the model call",
    ], out.stdout
