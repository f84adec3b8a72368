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
# MOAT_BENCH_BASELINE=PATH adds another moat binary, timed in turn with this one (before/after).
"$bin/moat-bench" --moat "$PWD/$bin/moat" ${MOAT_BENCH_BASELINE:+--baseline "$MOAT_BENCH_BASELINE"} --runs "$runs"

# The E2B SDKs against a release `moat serve` (the SDKs come from scripts/test-deps.sh's venv).
bash scripts/test-deps.sh >/dev/null
data=$(mktemp -d /tmp/moat-bench-e2b.XXXXXX)
port=$((20000 + RANDOM % 20000))
"$bin/moat" serve --listen "127.0.0.1:$port" --data-dir "$data" --rate-limit 1000000 >/dev/null 2>"$data/log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do [ -s "$data/admin.key" ] && curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
key=$(cat "$data/admin.key")
curl -sS --fail-with-body -X POST "http://127.0.0.1:$port/v1/templates" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d '{"name":"pooled","spec":{"rootfs":"host","user":"user","pool_size":8}}' >/dev/null
# The pool fills in the background: wait (at most 60 s) until all 8 members are ready, so the
# pooled rows time claims rather than cold starts.
ready=0
for _ in $(seq 600); do
  ready=$(curl -fsS "http://127.0.0.1:$port/v1/templates/pooled" -H "Authorization: Bearer $key" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["pool"]["ready"])')
  [ "$ready" -ge 8 ] && break
  sleep 0.1
done
if [ "$ready" -lt 8 ]; then
  echo "error: the warm pool of template 'pooled' has $ready of 8 members ready after 60 s" >&2
  exit 1
fi
echo
echo "## E2B SDKs against moat serve ($runs runs each)"
echo
E2B_API_URL="http://127.0.0.1:$port" E2B_SANDBOX_URL="http://127.0.0.1:$port" E2B_API_KEY="$key" \
  BENCH_POOLED_TEMPLATE=pooled target/test-venv/bin/python bench/e2b_sdk.py "$runs"

# Templates from images, against docker-registry on loopback (scripts/test-deps.sh installs it).
echo
echo "## Templates from images"
echo
echo "| what | runs | p50 | p99 | |"
echo "| --- | --- | --- | --- | --- |"
MOAT_BENCH_URL="http://127.0.0.1:$port" MOAT_BENCH_KEY="$key" \
  target/test-venv/bin/python bench/images.py "$runs"

# Asynchronous jobs against the same server (its own template with a warm pool).
echo
MOAT_BENCH_URL="http://127.0.0.1:$port" MOAT_BENCH_KEY="$key" \
  target/test-venv/bin/python bench/jobs.py 1000 8
