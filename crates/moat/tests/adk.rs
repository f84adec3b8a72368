//! The Google ADK suite (`tests/adk/`): the Python SDK's ADK integration
//! (`moat.integrations.adk`: `MoatCodeExecutor` and `MoatEnvironment`) driven through the
//! unmodified `google-adk`, against a real `moat serve`. Each test starts a server and runs one
//! pytest file with `MOAT_URL` and `MOAT_API_KEY` (the server's admin key) set, failing with
//! pytest's output; the fixtures never start a server themselves, and no test calls a model.
//!
//! The Python is `MOAT_TEST_PYTHON` (set by scripts/test.sh), else the venv
//! scripts/test-deps.sh makes, which has pytest from tests/python/requirements.txt and ADK from
//! tests/python/requirements-adk.txt. Needs root (the native backend); skips with a printed
//! reason otherwise.

use moat_test_support as support;

use support::need_root;
use support::server::*;

/// Runs `tests/adk/<file>` with pytest against a fresh `moat serve`.
fn run_pytest(file: &str) {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    // Settings that would make ADK reach for a model service.
    let remove = ["GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"];
    support::pytest(&format!("tests/adk/{file}"), &server, &[], &remove);
}

/// `MoatCodeExecutor` without state: a fresh sandbox per call, its output, tracebacks, input
/// and output files, timeouts, templates and bad input.
#[test]
fn code_executor() {
    run_pytest("test_executor.py");
}

/// `MoatCodeExecutor(stateful=True)`: one sandbox per ADK session, isolation, the idle
/// timeout, and cleanup.
#[test]
fn code_executor_sessions() {
    run_pytest("test_executor_sessions.py");
}

/// The executor inside ADK's code-execution flow and runner, with a scripted model.
#[test]
fn code_execution_flow() {
    run_pytest("test_flow.py");
}

/// `MoatEnvironment` on its own and through ADK's `EnvironmentToolset`.
#[test]
fn environment() {
    run_pytest("test_environment.py");
}

/// The examples of the README and docs/API.md, run as written.
#[test]
fn docs() {
    run_pytest("test_docs.py");
}
