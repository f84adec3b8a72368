#!/usr/bin/env bash
# Builds moat (release, statically linked) and installs it as /usr/local/bin/moat. Run as root on
# Debian 12 with a Rust toolchain (see the README); installs the C toolchain the link needs.
set -euo pipefail
cd "$(dirname "$0")/.."
# The static (crt-static) link needs gcc and glibc's static libraries, from libc6-dev.
need=()
command -v gcc >/dev/null || need+=(gcc)
dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --locked -p moat
install -m 0755 target/x86_64-unknown-linux-gnu/release/moat /usr/local/bin/moat
echo "installed /usr/local/bin/moat ($(/usr/local/bin/moat --version))"
