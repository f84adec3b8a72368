#!/usr/bin/env bash
# Builds moat and the benchmark in release mode, installs the peers (bubblewrap, gVisor's runsc)
# and runs every benchmark side by side. Prints a Markdown report; run as root.
#   bench/run.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-200}"
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v runsc >/dev/null || need+=(runsc)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" || echo "note: could not install ${need[*]}; those peers are skipped"
fi
cargo build --release --locked -p moat -p moat-bench
bin=target/x86_64-unknown-linux-gnu/release
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
echo
"$bin/moat-bench" --moat "$PWD/$bin/moat" --runs "$runs"
