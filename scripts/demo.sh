#!/usr/bin/env bash
# The local demo (README's first command): creates .venv if missing, installs the user CLI
# (`pip install -e '.[local]'`), then runs examples/iris.yaml on this machine: two iris model
# variants behind the weighted router on http://127.0.0.1:8080. Ctrl-C stops everything.
# Arguments go to `modeldeploy run`, e.g. `bash scripts/demo.sh --port 9090`.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "modeldeploy needs Python >= 3.11 (set PYTHON=/path/to/python3.11 or newer)." >&2
        exit 1
    fi
    echo "Creating .venv with $("$python" --version)"
    if ! "$python" -m venv .venv; then
        echo "Could not create .venv; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
        exit 1
    fi
fi
echo "Installing modeldeploy with the local extra into .venv (first time: a minute or two)"
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[local]'
exec .venv/bin/modeldeploy run -f examples/iris.yaml "$@"
