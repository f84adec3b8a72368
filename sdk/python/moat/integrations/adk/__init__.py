"""Google ADK (``google-adk``) support: run an agent's code in moat sandboxes.

- :class:`MoatCodeExecutor`, a ``BaseCodeExecutor`` for ``LlmAgent(code_executor=...)``: the
  code blocks a model writes run in a fresh sandbox each, or, with ``stateful=True``, in one
  sandbox and one interpreter per ADK session.
- :class:`MoatEnvironment`, a ``BaseEnvironment`` for ADK's ``EnvironmentToolset``: shell
  commands and file reads and writes in one sandbox (where the installed ADK has
  ``google.adk.environment``).

Both reach the server at ``MOAT_URL`` with the key in ``MOAT_API_KEY`` unless given ``url`` and
``api_key``, and give their sandboxes no network unless told otherwise.

    from google.adk.agents import LlmAgent
    from moat.integrations.adk import MoatCodeExecutor

    agent = LlmAgent(name="analyst", model="gemini-2.5-flash", code_executor=MoatCodeExecutor())
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

try:
    import google.adk  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "moat.integrations.adk needs Google ADK: pip install google-adk"
    ) from e

from ._executor import MoatCodeExecutor

__all__ = ["MoatCodeExecutor", "MoatEnvironment"]

# BaseEnvironment is recent (and experimental) in ADK: older releases have only executors.
if importlib.util.find_spec("google.adk.environment") is not None:
    from ._environment import MoatEnvironment
elif not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name == "MoatEnvironment":
            raise ImportError(
                "MoatEnvironment needs a google-adk with google.adk.environment "
                "(BaseEnvironment); upgrade google-adk"
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
