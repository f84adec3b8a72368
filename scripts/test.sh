#!/usr/bin/env bash
# Runs every test: formatting, lints, unit, integration, protocol and security tests.
# Needs root (sandboxes map uid ranges and make cgroups); installs its own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# The Python the tests use for real clients and validators (see scripts/test-deps.sh).
export MOAT_TEST_PYTHON="$PWD/target/test-venv/bin/python"
cargo nextest run --locked --workspace --profile ci
