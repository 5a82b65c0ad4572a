#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs the package
# into it (pinned by constraints.txt) when pyproject.toml or constraints.txt changed, then
# runs the main job or the tests.
#   ./run.sh demo [jaxcnmf demo options]   concept analysis of the bundled digits, offline
#   ./run.sh test [pytest options]         the test suite
#   ./run.sh jaxcnmf ...                   any jaxcnmf command in the environment
#   ./run.sh lock                          refresh constraints.txt: newest versions in a
#                                          fresh environment, written only if the suite passes
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${JAXCNMF_VENV:-.venv}

install() {  # install VENV [constraints file]
    local venv=$1
    shift
    if [ ! -x "$venv/bin/python" ]; then
        echo "[run.sh] creating $venv" >&2
        "$PY" -m venv "$venv"
    fi
    echo "[run.sh] installing jaxcnmf and its dependencies into $venv (first time: a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e ".[test]" "$@"
}

cmd=${1:-demo}
shift || true
if [ "$cmd" = lock ]; then
    fresh=$(mktemp -d)/venv
    install "$fresh"
    "$fresh/bin/python" -m pytest -q -x "$@"
    {
        sed -n '1,/^# the suite must pass/p' constraints.txt
        "$fresh/bin/python" -m pip freeze --exclude-editable | grep -v '^jaxcnmf'
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    rm -rf "$(dirname "$fresh")"
    echo "[run.sh] constraints.txt refreshed; commit it" >&2
    exit 0
fi

stamp="$VENV/.jaxcnmf-installed"
if [ ! -f "$stamp" ] || ! cat pyproject.toml constraints.txt | cmp -s - "$stamp"; then
    install "$VENV" -c constraints.txt
    cat pyproject.toml constraints.txt > "$stamp"
fi
case "$cmd" in
    demo) exec "$VENV/bin/jaxcnmf" demo "$@" ;;
    # Test files in parallel workers (at most 4; `./run.sh test -n 0` runs in one process).
    test) exec "$VENV/bin/python" -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@" ;;
    jaxcnmf) exec "$VENV/bin/jaxcnmf" "$@" ;;
    *) echo "usage: ./run.sh demo|test|jaxcnmf|lock [args...]" >&2; exit 2 ;;
esac
