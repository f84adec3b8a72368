"""The E2B Python SDKs against a running `moat serve`: what an agent developer's code sees.

Measures, through the unmodified `e2b` and `e2b-code-interpreter` packages:
  - Sandbox.create() + commands.run("echo hi") + kill(), one after another;
  - run_code("1+1") on a warm context (the interpreter already started).

Needs E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY in the environment (bench/run.sh sets them);
BENCH_POOLED_TEMPLATE names a template with a warm pool to measure as well.
Prints one Markdown table row per measurement: name, runs, p50, p99 in milliseconds.

    python bench/e2b_sdk.py [RUNS]
"""

import os
import statistics
import sys
import time

from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox


def percentile(samples, p):
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(name, samples):
    print(
        f"| {name} | {len(samples)} | {statistics.median(samples):.1f} | "
        f"{percentile(samples, 99):.1f} |"
    )


def create_run_kill(runs, template=None):
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sbx = Sandbox.create(template) if template else Sandbox.create()
        result = sbx.commands.run("echo hi")
        sbx.kill()
        samples.append((time.perf_counter() - t0) * 1000)
        assert result.stdout == "hi\n", result
    return samples


def run_code_warm(runs):
    sbx = CodeSandbox.create()
    try:
        sbx.run_code("1+1")  # starts the interpreter
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            execution = sbx.run_code("1+1")
            samples.append((time.perf_counter() - t0) * 1000)
            assert execution.text == "2", execution
        return samples
    finally:
        sbx.kill()


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    # One of each first: imports, connection pools and the server's first pool fill.
    create_run_kill(3)
    print("| E2B Python SDK | runs | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    row(
        "`Sandbox.create()` + `commands.run(\"echo hi\")` + `kill()` (`base`, cold start)",
        create_run_kill(runs),
    )
    pooled = os.environ.get("BENCH_POOLED_TEMPLATE")
    if pooled:
        create_run_kill(3, pooled)
        row(
            f"the same with `Sandbox.create(\"{pooled}\")` (a template with a warm pool)",
            create_run_kill(runs, pooled),
        )
    row("`run_code(\"1+1\")`, warm context", run_code_warm(runs))


if __name__ == "__main__":
    main()
