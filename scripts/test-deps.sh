#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine (idempotent). Run as root.
set -euo pipefail
need=()
command -v python3 >/dev/null || need+=(python3)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -x /usr/bin/python3 ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
