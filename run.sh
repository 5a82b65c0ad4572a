#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs the package
# into it when pyproject.toml changed, then runs the main job or the tests.
#   ./run.sh demo [jaxcnmf demo options]   concept analysis of the bundled digits, offline
#   ./run.sh test [pytest options]         the test suite
#   ./run.sh jaxcnmf ...                   any jaxcnmf command in the environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${JAXCNMF_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.jaxcnmf-installed"
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
    echo "[run.sh] installing jaxcnmf and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    cp pyproject.toml "$stamp"
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
    demo) exec "$VENV/bin/jaxcnmf" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
    jaxcnmf) exec "$VENV/bin/jaxcnmf" "$@" ;;
    *) echo "usage: ./run.sh demo|test|jaxcnmf [args...]" >&2; exit 2 ;;
esac
