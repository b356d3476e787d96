#!/usr/bin/env bash
# Builds (or reuses) the test control plane: kube-apiserver and kube-controller-manager from
# k8s.io/kubernetes, etcd from go.etcd.io/etcd/server/v3, and the Gateway API standard CRDs, all
# through the Go module proxy, into a cache outside the repo keyed by version.
# `node` also builds what a real node needs (tests/cluster): kubelet, kube-proxy, kube-scheduler
# and kubectl from the same pinned k8s.io/kubernetes, and CoreDNS from its Go module.
# Without an argument it also builds the Prometheus server that the rollout tests query (issue 12),
# from its Go module; `prometheus` builds only that.
# Usage: tests/controlplane/build.sh [node|coredns|prometheus]
#        (env MODELDEPLOY_CONTROLPLANE_CACHE overrides the cache root)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${MODELDEPLOY_CONTROLPLANE_CACHE:-$HOME/.cache/modeldeploy-controlplane}"
k8s_dir="$cache/kubernetes-$KUBERNETES_VERSION"
etcd_dir="$cache/etcd-$ETCD_VERSION"
gw_dir="$cache/gateway-api-$GATEWAY_API_VERSION"
node_dir="$cache/kubernetes-node-$KUBERNETES_VERSION"
coredns_dir="$cache/coredns-$COREDNS_VERSION"
prometheus_dir="$cache/prometheus-$PROMETHEUS_VERSION-kubernetes-sd"

# The release's own go line may be older than the local toolchain; never let Go download another.
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -trimpath"

json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
log() { printf '[controlplane-build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

command -v go >/dev/null || {
    log "Go toolchain not found: install Go >= $GO_VERSION (https://go.dev/dl/) and re-run $0"
    exit 2
}
# `major.minor` of a Go version: go1.26.8 -> 1.26, 1.25.0 -> 1.25.
go_minor() { local v="${1#go}"; v="${v%%[!0-9.]*}"; printf '%s' "$(cut -d. -f1-2 <<<"$v")"; }
at_least() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }
local_go="$(go_minor "$(go env GOVERSION)")"
at_least "$local_go" "$GO_VERSION" || {
    log "Go $local_go is too old: these components need Go >= $GO_VERSION (https://go.dev/dl/)"
    exit 2
}
# Keeps versions.env's GO_VERSION (quoted by the README) true when a pinned version moves.
check_go_line() {
    local what="$1" gomod="$2" needs
    needs="$(go_minor "$(go mod edit -json "$gomod" | json_field Go)")"
    at_least "$GO_VERSION" "$needs" || {
        log "$what needs Go >= $needs but versions.env says GO_VERSION=$GO_VERSION: update it (and the README)"
        exit 2
    }
}

# A fresh throwaway module per component; removed on exit.
workdirs=()
cleanup() { if ((${#workdirs[@]})); then chmod -R u+w "${workdirs[@]}" 2>/dev/null || true; rm -rf "${workdirs[@]}"; fi; }
trap cleanup EXIT
new_module() {
    local w
    w="$(mktemp -d)"
    workdirs+=("$w")
    (cd "$w" && go mod init "example.com/$1" >/dev/null 2>&1)
    printf '%s' "$w"
}

# Binaries are built into a staging dir and renamed into place, so a half-built cache is never used.
publish() {
    local staged="$1" final="$2"
    mkdir -p "$(dirname "$final")"
    rm -rf "$final"
    mv "$staged" "$final"
}


# Reads `go mod edit -json` of upstream's go.mod; prints `go mod edit` flags that re-point every
# staging module at its published tag (argv[1]) and copy upstream's godebug defaults.
replace_edits_py='
import json, sys
mod = json.load(sys.stdin)
for r in mod.get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        path = r["Old"]["Path"]
        print(f"-replace={path}={path}@{sys.argv[1]}")
for g in mod.get("Godebug") or []:
    print("-godebug=" + g["Key"] + "=" + g["Value"])
'

# `go build -v` names each package as it is compiled: show a running count instead of ~3000
# lines, and pass everything else (compiler errors) through.
count_packages() {
    awk '/^[^ :#]+$/ { if (++n % 250 == 0) { print "  ... " n " packages compiled"; fflush() } next }
         { print; fflush() }
         END { print "  ... " n + 0 " packages compiled in total" }' >&2
}

build_etcd() {
    if [[ -x "$etcd_dir/etcd" ]]; then log "etcd $ETCD_VERSION: cached at $etcd_dir"; return; fi
    log "etcd $ETCD_VERSION: resolving modules (go get -tool; cold: a minute of downloads)"
    local w
    w="$(new_module etcdbin)"
    (cd "$w" && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
    check_go_line "etcd $ETCD_VERSION" \
        "$(go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" | json_field GoMod)"
    log "etcd $ETCD_VERSION: compiling (cold build: about 1 min on 2 cores)"
    mkdir -p "$w/out"
    (cd "$w" && go build -v -ldflags="-s -w" -o out/etcd go.etcd.io/etcd/server/v3 2>&1) |
        count_packages
    publish "$w/out" "$etcd_dir"
    log "etcd $ETCD_VERSION: done -> $etcd_dir/etcd"
}

fetch_gateway_crds() {
    if [[ -f "$gw_dir/.complete" ]]; then log "Gateway API $GATEWAY_API_VERSION: cached at $gw_dir"; return; fi
    log "Gateway API $GATEWAY_API_VERSION: downloading module"
    local mod_dir staged
    mod_dir="$(go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" | json_field Dir)"
    staged="$(mktemp -d)"
    workdirs+=("$staged")
    cp "$mod_dir"/config/crd/standard/*.yaml "$staged/"
    chmod 755 "$staged"
    chmod 644 "$staged"/*.yaml
    touch "$staged/.complete"
    publish "$staged" "$gw_dir"
    log "Gateway API $GATEWAY_API_VERSION: done -> $gw_dir"
}

# build_kubernetes DIR CMD...: builds k8s.io/kubernetes/cmd/<CMD> for each CMD into DIR.
build_kubernetes() {
    local out_dir="$1"
    shift
    local cmds=("$@") cmd missing=()
    for cmd in "${cmds[@]}"; do [[ -x "$out_dir/$cmd" ]] || missing+=("$cmd"); done
    if ((${#missing[@]} == 0)); then
        log "kubernetes $KUBERNETES_VERSION: cached at $out_dir (${cmds[*]})"
        return
    fi
    local w upstream_gomod staging_version minor
    log "kubernetes $KUBERNETES_VERSION: downloading k8s.io/kubernetes"
    upstream_gomod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | json_field GoMod)"
    check_go_line "k8s.io/kubernetes $KUBERNETES_VERSION" "$upstream_gomod"
    # Staging modules are published as k8s.io/<name> v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
    staging_version="v0.${KUBERNETES_VERSION#v1.}"
    minor="${KUBERNETES_VERSION#v1.}"
    minor="${minor%%.*}"
    w="$(new_module envtestbins)"
    # Upstream's replace lines point at ./staging/src/...; Go ignores a dependency's replaces, so the
    # same list is re-declared here against the published staging tags.
    go mod edit -json "$upstream_gomod" | python3 -c "$replace_edits_py" "$staging_version" >"$w/edits"
    log "kubernetes $KUBERNETES_VERSION: $(grep -c -- -replace= "$w/edits") staging modules at $staging_version"
    (cd "$w" && xargs go mod edit <edits && go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION")
    local packages=() tools=()
    for cmd in "${cmds[@]}"; do
        packages+=("k8s.io/kubernetes/cmd/$cmd")
        # The @version matters: without it `go get` upgrades k8s.io/kubernetes to its latest release.
        tools+=("k8s.io/kubernetes/cmd/$cmd@$KUBERNETES_VERSION")
    done
    log "kubernetes $KUBERNETES_VERSION: resolving modules (go get -tool)"
    (cd "$w" && go get -tool "${tools[@]}")
    # Without these the binaries report v0.0.0-master, which clients print as a version skew.
    local v="k8s.io/component-base/version" c="k8s.io/client-go/pkg/version" ldflags="-s -w"
    for pkg in "$v" "$c"; do
        ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean"
    done
    log "kubernetes $KUBERNETES_VERSION: compiling ${cmds[*]}" \
        "(GOMAXPROCS=${GOMAXPROCS:-all}; cold build: about 4 min on 2 cores)"
    mkdir -p "$w/out"
    (cd "$w" && go build -v -ldflags="$ldflags" -o out/ "${packages[@]}" 2>&1) | count_packages
    for cmd in "${cmds[@]}"; do [[ -x "$w/out/$cmd" ]]; done
    publish "$w/out" "$out_dir"
    log "kubernetes $KUBERNETES_VERSION: done -> $out_dir"
}

build_coredns() {
    if [[ -x "$coredns_dir/coredns" ]]; then log "CoreDNS $COREDNS_VERSION: cached at $coredns_dir"; return; fi
    log "CoreDNS $COREDNS_VERSION: resolving modules"
    local w
    w="$(new_module corednsbin)"
    (cd "$w" && go get -tool "github.com/coredns/coredns@$COREDNS_VERSION")
    log "CoreDNS $COREDNS_VERSION: compiling (cold build: about 3 min on 2 cores)"
    mkdir -p "$w/out"
    (cd "$w" && go build -v -ldflags="-s -w" -o out/coredns github.com/coredns/coredns 2>&1) \
        | count_packages
    [[ -x "$w/out/coredns" ]]
    publish "$w/out" "$coredns_dir"
    log "CoreDNS $COREDNS_VERSION: done -> $coredns_dir/coredns"
}

# Prometheus server without its UI assets (the HTTP API is all the tests use) and with only the
# static/file/http and Kubernetes service discovery (no cloud SDKs to compile; the real-cluster
# suite finds the pods as examples/prometheus/scrape.yaml tells it to).
build_prometheus() {
    if [[ -x "$prometheus_dir/prometheus" ]]; then
        log "Prometheus $PROMETHEUS_VERSION: cached at $prometheus_dir"
        return
    fi
    log "Prometheus $PROMETHEUS_VERSION: resolving modules"
    local w pkg=github.com/prometheus/prometheus/cmd/prometheus
    w="$(new_module prometheusbin)"
    (cd "$w" && go get -tool "$pkg@$PROMETHEUS_VERSION")
    check_go_line "Prometheus $PROMETHEUS_VERSION" \
        "$(go mod download -json "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" | json_field GoMod)"
    log "Prometheus $PROMETHEUS_VERSION: compiling (cold build: about 6 min on 2 cores)"
    mkdir -p "$w/out"
    (cd "$w" && go build -v -tags=remove_all_sd,enable_kubernetes_sd -ldflags="-s -w" -o out/prometheus "$pkg" 2>&1) \
        | count_packages
    [[ -x "$w/out/prometheus" ]]
    publish "$w/out" "$prometheus_dir"
    log "Prometheus $PROMETHEUS_VERSION: done -> $prometheus_dir/prometheus"
}

started=$SECONDS
case "${1:-}" in
"")
    build_etcd
    fetch_gateway_crds
    build_kubernetes "$k8s_dir" kube-apiserver kube-controller-manager
    build_prometheus
    ;;
node)
    build_kubernetes "$node_dir" kubelet kube-proxy kube-scheduler kubectl
    build_coredns
    ;;
coredns) build_coredns ;;
prometheus) build_prometheus ;;
*)
    log "usage: $0 [node|coredns|prometheus]"
    exit 2
    ;;
esac
log "all components ready in $((SECONDS - started))s under $cache"
