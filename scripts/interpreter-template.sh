#!/usr/bin/env bash
# Builds the data-science code interpreter (templates/code-interpreter: numpy, pandas and
# matplotlib on a Python 3.11 image) with moat's own build, on a running moat serve.
#   MOAT_URL=… MOAT_API_KEY=… scripts/interpreter-template.sh BASE_IMAGE [TEMPLATE]
# BASE_IMAGE is a Python 3.11 image the server can pull (scripts/python-image.py pushes one);
# TEMPLATE defaults to code-interpreter-v1, the E2B code interpreter SDK's template, which only
# an admin key may replace (for every tenant). The wheels come from PyPI unless WHEELS names a
# directory that has them (scripts/test-deps.sh keeps one in target/wheels/code-interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:?usage: scripts/interpreter-template.sh BASE_IMAGE [TEMPLATE]}"
template="${2:-code-interpreter-v1}"
moat="${MOAT_BIN:-moat}"
ctx=$(mktemp -d /tmp/moat-interpreter.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp templates/code-interpreter/Dockerfile "$ctx/"
mkdir "$ctx/wheels"
cp templates/code-interpreter/requirements.txt "$ctx/wheels/"
if [ -n "${WHEELS:-}" ]; then
  cp "$WHEELS"/*.whl "$ctx/wheels/"
else
  "${PYTHON:-python3}" -m pip download --quiet --only-binary=:all: --no-deps \
    -r templates/code-interpreter/requirements.txt -d "$ctx/wheels"
fi
"$moat" template build "$template" "$ctx" --build-arg BASE="$base" --memory 2G --disk 4G
