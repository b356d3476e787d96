#!/usr/bin/env bash
# The project's test command (README; .ci/run runs it). On a fresh machine it creates .venv,
# installs the project with its test extra, builds or reuses the test control plane
# (tests/controlplane/build.sh), runs the linters, then pytest over tests/. Arguments go to pytest
# (e.g. `scripts/test.sh tests/controlplane -x`). With CI=true a missing Go toolchain or a failed
# control-plane build is fatal.
set -euo pipefail
cd "$(dirname "$0")/.."

ci=false
[[ "${CI:-}" == "true" ]] && ci=true
phases=()
failed=()

banner() { printf '\n==================== %s ====================\n' "$*"; }

# Runs one labelled phase, records its wall time, and remembers (without stopping) a failure.
# `set -e` does not apply inside a phase (it runs under `||`), so phases return their status.
phase() {
    local name="$1" started=$SECONDS rc=0
    shift
    banner "$name"
    "$@" || rc=$?
    phases+=("$(printf '%-16s %5ds  %s' "$name" $((SECONDS - started)) \
        "$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")")")
    if [[ $rc != 0 ]]; then failed+=("$name"); fi
    return 0
}

summary() {
    banner "summary"
    printf '%s\n' "${phases[@]}"
}

install() {
    if [[ ! -x .venv/bin/python ]]; then
        echo "creating .venv with $(python3 --version)"
        python3 -m venv .venv || return
    fi
    echo "installing the project and its test extra into .venv (pip; a cold install fetches about 130 packages)"
    # pip's own lines show progress (Collecting, Downloading, Installing...); the ~100 lines of
    # "Requirement already satisfied" of a warm install are counted instead.
    .venv/bin/pip install --disable-pip-version-check --progress-bar off -e '.[test]' 2>&1 |
        awk '/^Requirement already satisfied/ { n++; next } { print; fflush() }
             END { if (n) print n " requirements already satisfied" }'
}

build_control_plane() {
    if ! command -v go >/dev/null; then
        echo "Go is not installed: control-plane tests will be skipped" \
            "(install Go >= $(sed -n 's/^GO_VERSION=//p' tests/controlplane/versions.env))."
        [[ $ci == false ]]
        return
    fi
    bash tests/controlplane/build.sh
}

lint() {
    local rc=0
    echo "--- ruff check"
    .venv/bin/ruff check . || rc=1
    echo "--- mypy (strict, from pyproject)"
    .venv/bin/mypy -p modeldeploy_server -p modeldeploy_operator || rc=1
    local dockerfiles=(Dockerfile.*)
    if [[ -e "${dockerfiles[0]}" ]]; then
        echo "--- hadolint ${dockerfiles[*]}"
        .venv/bin/hadolint "${dockerfiles[@]}" || rc=1
    fi
    if grep -q '^\[\[tool\.importlinter\.contracts\]\]' pyproject.toml; then
        echo "--- lint-imports"
        .venv/bin/lint-imports || rc=1
    fi
    return $rc
}

phase install install
if [[ ${#failed[@]} != 0 ]]; then summary; exit 1; fi
phase build build_control_plane
if [[ $ci == true && ${#failed[@]} != 0 ]]; then
    echo "CI=true: the control-plane build failed; the operator cannot be tested without it." >&2
    summary
    exit 1
fi
phase lint lint
# Any non-zero pytest exit fails the phase, including 5 (no tests collected). Without arguments
# pytest runs its configured testpaths (tests/).
phase tests .venv/bin/pytest "$@"
summary
if [[ ${#failed[@]} != 0 ]]; then
    echo "failed phases: ${failed[*]}" >&2
    exit 1
fi
