#!/usr/bin/env bash
# The project's test command (README; .ci/run runs it). On a fresh machine it creates .venv,
# installs the project with its test extra, builds or reuses the test control plane
# (tests/controlplane/build.sh), runs the linters, then pytest over tests/ except the real-cluster
# suite, then (without arguments) builds the real single-node cluster (tests/cluster/build.sh)
# and runs that suite (`-m cluster`). Arguments go to pytest and skip the cluster phases
# (e.g. `scripts/test.sh tests/controlplane -x`). With CI=true a missing Go toolchain, a failed
# control-plane build, or a machine that cannot run the cluster is fatal.
# MODELDEPLOY_CLUSTER=0 leaves the cluster phases out (a quick run on a laptop); CI runs them.
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

# What the real-cluster phases need and this machine lacks (nothing printed: all there).
cluster_missing() {
    [[ $(id -u) == 0 ]] || echo "root (the cluster runs containerd, kubelet and iptables)"
    command -v go >/dev/null || echo "a Go toolchain >= 1.25"
    command -v apt-get >/dev/null || command -v buildah >/dev/null ||
        echo "apt-get (Debian's containerd, runc, CNI plugins, iptables, buildah, debootstrap)"
    [[ -d /sys/fs/cgroup ]] || echo "cgroups (/sys/fs/cgroup)"
}

build_cluster() {
    local missing
    missing="$(cluster_missing)"
    if [[ -n $missing ]]; then
        echo "The real-cluster suite cannot run on this machine; missing:"
        printf '  - %s\n' "$missing"
        [[ $ci == false ]]
        return
    fi
    bash tests/cluster/build.sh all
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
phase tests .venv/bin/pytest -m "not cluster" "$@"
if [[ $# == 0 && ${MODELDEPLOY_CLUSTER:-1} == 1 ]]; then
    phase cluster-build build_cluster
    # The suite's fixture starts the cluster, and stops it afterwards, removing what it made.
    # Without the build (a machine that cannot run it, outside CI) it skips with the reason.
    phase cluster .venv/bin/pytest -m cluster tests/cluster
elif [[ $# == 0 ]]; then
    echo "real-cluster suite not run (MODELDEPLOY_CLUSTER=0)"
fi
summary
if [[ ${#failed[@]} != 0 ]]; then
    echo "failed phases: ${failed[*]}" >&2
    exit 1
fi
