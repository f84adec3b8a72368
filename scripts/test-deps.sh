#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine (idempotent). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v python3 >/dev/null || need+=(python3)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -x /usr/bin/python3 ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

# A virtual environment for the Python tools and clients the tests drive (kept in target/, so
# `cargo clean` removes it). Debian's python3 needs python3-venv for `-m venv`.
venv=target/test-venv
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

# Older generations of the e2b SDK, one venv each, for tests/e2b/test_sdk_generations.py.
for version in 2.7 2.50; do
  old="target/test-venv-e2b-$version"
  [ -x "$old/bin/python" ] || python3 -m venv "$old"
  "$old/bin/python" -m pip install -q --disable-pip-version-check \
    -r "tests/python/requirements-e2b-$version.txt"
done

# The e2b JavaScript SDK for the Node smoke test (tests/e2b/js, versions pinned by its lock file).
if ! command -v npm >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
stamp=tests/e2b/js/node_modules/.installed-from-lock
if ! cmp -s tests/e2b/js/package-lock.json "$stamp" 2>/dev/null; then
  (cd tests/e2b/js && npm ci --silent --no-audit --no-fund)
  cp tests/e2b/js/package-lock.json "$stamp"
fi
