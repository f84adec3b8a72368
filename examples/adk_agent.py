"""A Google ADK agent whose code runs in moat sandboxes (`MoatCodeExecutor`).

Needs a moat server (MOAT_URL, MOAT_API_KEY) and `pip install google-adk ./sdk/python`.
Without a model key it builds the agent and runs one code block through the executor the way
ADK's flow would, then stops before the model call. With `GOOGLE_API_KEY` set (a Gemini API
key; or Vertex AI's variables, see ADK's docs), it also asks the model a question that needs
code, and prints the answer:

    GOOGLE_API_KEY=... python examples/adk_agent.py "What is the 30th Fibonacci number?"
"""

import asyncio
import os
import sys

from google.adk.agents import LlmAgent
from google.adk.code_executors.code_execution_utils import CodeExecutionInput
from google.adk.runners import InMemoryRunner
from google.genai import types

from moat.integrations.adk import MoatCodeExecutor

executor = MoatCodeExecutor(stateful=True)
agent = LlmAgent(
    name="analyst",
    model="gemini-2.5-flash",
    instruction="When a question needs a calculation, answer it with Python code.",
    code_executor=executor,
)


async def ask(question: str) -> None:
    runner = InMemoryRunner(agent=agent, app_name="moat-example")
    session = await runner.session_service.create_session(app_name="moat-example", user_id="me")
    message = types.Content(role="user", parts=[types.Part(text=question)])
    async for event in runner.run_async(user_id="me", session_id=session.id, new_message=message):
        for part in (event.content.parts if event.content else []) or []:
            if part.text:
                print(part.text)


def main() -> None:
    # What ADK's flow does with a code block the model wrote: run it through the executor.
    block = CodeExecutionInput(code="print(sum(range(10)))", execution_id="example")
    result = executor.execute_code(None, block)  # type: ignore[arg-type]
    print("executor:", result.stdout.strip(), "| stderr:", repr(result.stderr))
    if not (os.environ.get("GOOGLE_API_KEY") or os.environ.get("GOOGLE_GENAI_USE_VERTEXAI")):
        print("no model key (GOOGLE_API_KEY): stopping before the model call")
        return
    asyncio.run(ask(sys.argv[1] if len(sys.argv) > 1 else "What is 2**100?"))


if __name__ == "__main__":
    try:
        main()
    finally:
        executor.close()
