#!/usr/bin/env bash
# Builds moat (release, statically linked) and installs it as /usr/local/bin/moat.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p moat
install -m 0755 target/x86_64-unknown-linux-gnu/release/moat /usr/local/bin/moat
echo "installed /usr/local/bin/moat ($(/usr/local/bin/moat --version))"
