#!/usr/bin/env bash
# Builds (or reuses) everything the real single-node cluster (tests/cluster) needs. Each step is
# idempotent and cached outside the repo, under ~/.cache/modeldeploy-cluster
# (MODELDEPLOY_CLUSTER_CACHE) and the control-plane cache of tests/controlplane/build.sh:
#   packages  Debian packages: containerd, runc, CNI plugins, iptables, buildah, skopeo,
#             debootstrap, conntrack, socat (apt-get, as root)
#   binaries  etcd, kube-apiserver, kube-controller-manager (tests/controlplane/build.sh), then
#             kubelet, kube-proxy, kube-scheduler, kubectl and CoreDNS (build.sh node)
#   base      the pod sandbox ("pause") image from tests/cluster/pause/main.go, and a Python base
#             image made with debootstrap, tagged with the names the Dockerfiles' FROM lines use
#   images    the project's images, built with `buildah bud` from the unchanged Dockerfile.server
#             and Dockerfile.operator, tagged by a hash of their inputs
#   names     prints the image names and archive paths for this tree (KEY=VALUE), builds nothing
# Usage: tests/cluster/build.sh [packages|binaries|base|images|names|all]...   (default: all)
# Needs root (apt, buildah and the cluster itself), Go >= 1.25 and the package registries.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${MODELDEPLOY_CLUSTER_CACHE:-$HOME/.cache/modeldeploy-cluster}"
# buildah keeps its images in the cache too, so removing the cache removes every image.
buildah_store=(--root "$cache/buildah/root" --runroot "$cache/buildah/run" --storage-driver overlay)
suite=bookworm
packages=(containerd runc containernetworking-plugins iptables buildah skopeo debootstrap conntrack socat)
# debootstrap --include: what the python:X.Y-slim-bookworm images provide that the Dockerfiles use.
base_packages=python3,python3-venv,python3-pip,python-is-python3,ca-certificates

log() { printf '[cluster-build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
bah() { buildah "${buildah_store[@]}" "$@"; }

# Prints "<first 12 hex of sha256>" over the content of the given paths (tracked and untracked,
# not ignored), so an image tag changes exactly when an input of its build changes.
content_hash() {
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard -- "$@" | sort -z |
        xargs -0 sha256sum | sha256sum | cut -c1-12)
}

server_tag="h-$(content_hash Dockerfile.server pyproject.toml README.md server operator crds)"
operator_tag="h-$(content_hash Dockerfile.operator pyproject.toml README.md server operator crds)"
pause_tag="h-$(content_hash tests/cluster/pause)"
server_image="localhost/modeldeploy-server:$server_tag"
operator_image="localhost/modeldeploy-operator:$operator_tag"
pause_image="localhost/modeldeploy-pause:$pause_tag"
archive() { printf '%s/images/%s-%s.tar' "$cache" "$1" "$2"; }

names() {
    printf 'SERVER_IMAGE=%s\nSERVER_ARCHIVE=%s\n' "$server_image" "$(archive server "$server_tag")"
    printf 'OPERATOR_IMAGE=%s\nOPERATOR_ARCHIVE=%s\n' "$operator_image" \
        "$(archive operator "$operator_tag")"
    printf 'PAUSE_IMAGE=%s\nPAUSE_ARCHIVE=%s\n' "$pause_image" "$(archive pause "$pause_tag")"
}

need_root() {
    [[ $(id -u) == 0 ]] || { log "$1 needs root (run as root, or skip the cluster suite)"; exit 2; }
}

install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then log "packages: all installed"; return; fi
    need_root "apt-get install ${missing[*]}"
    command -v apt-get >/dev/null || { log "no apt-get: install ${missing[*]} by hand"; exit 2; }
    log "packages: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}"
}

build_binaries() {
    bash "$repo/tests/controlplane/build.sh"
    bash "$repo/tests/controlplane/build.sh" node
}

# Saves a buildah image as a docker-archive that `ctr images import` names exactly as tagged.
save_archive() {
    local image="$1" file="$2"
    mkdir -p "$(dirname "$file")"
    rm -f "$file.part"
    bah push --quiet "$image" "docker-archive:$file.part:$image"
    mv "$file.part" "$file"
}

build_pause() {
    local file
    file="$(archive pause "$pause_tag")"
    if [[ -f $file ]]; then log "pause image: cached ($pause_image)"; return; fi
    log "pause image: compiling tests/cluster/pause"
    local w c
    w="$(mktemp -d)"
    cp "$here/pause/main.go" "$w/"
    (cd "$w" && go mod init example.com/pause >/dev/null 2>&1 &&
        GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o pause .)
    c="$(bah from scratch)"
    bah copy "$c" "$w/pause" /pause >/dev/null
    bah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
    bah commit --quiet --rm "$c" "$pause_image" >/dev/null
    rm -rf "$w"
    save_archive "$pause_image" "$file"
    log "pause image: done -> $file"
}

# The FROM images of both Dockerfiles (stage names excluded), one per line.
from_images() {
    local stages
    stages="$(awk 'toupper($1) == "FROM" && toupper($3) == "AS" { print $4 }' "$repo"/Dockerfile.*)"
    awk 'toupper($1) == "FROM" { print $2 }' "$repo"/Dockerfile.* | sort -u |
        grep -vxF -f <(printf '%s\n' "$stages") || true
}

build_python_base() {
    local name version missing=()
    while read -r name; do
        bah inspect --type image "$name" >/dev/null 2>&1 || missing+=("$name")
    done < <(from_images)
    if ((${#missing[@]} == 0)); then log "Python base image: cached ($(from_images | xargs))"; return; fi
    for name in "${missing[@]}"; do
        # Only python:X.Y-slim-<suite> can be made from Debian: its python3 must be that X.Y.
        if [[ ! $name =~ ^(docker\.io/library/)?python:([0-9]+\.[0-9]+)-slim-$suite$ ]]; then
            log "cannot make base image $name locally (only python:X.Y-slim-$suite)"
            exit 2
        fi
    done
    need_root debootstrap
    local rootfs c
    rootfs="$(mktemp -d)"
    log "Python base image: debootstrap $suite (cold: about 3 min)"
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" \
        http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    version="$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    for name in "${missing[@]}"; do
        [[ $name =~ python:$version- ]] || {
            log "Debian $suite has Python $version; $name asks for another version"
            exit 2
        }
    done
    tar -C "$rootfs" -cf "$rootfs.tar" .
    rm -rf "$rootfs"
    c="$(bah from scratch)"
    bah add "$c" "$rootfs.tar" / >/dev/null
    rm -f "$rootfs.tar"
    bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 "$c"
    bah commit --quiet --rm "$c" "${missing[0]}" >/dev/null
    # A short name resolves to localhost/ or docker.io/library/: tag both.
    for name in "${missing[@]}"; do
        bah tag "${missing[0]}" "$name" "docker.io/library/${name#docker.io/library/}"
    done
    log "Python base image: done (${missing[*]}, Python $version)"
}

build_project_image() {
    local what="$1" image="$2" tag="$3" file
    file="$(archive "$what" "$tag")"
    if [[ -f $file ]]; then log "$what image: cached ($image)"; return; fi
    log "$what image: buildah bud -f Dockerfile.$what (cold: server about 3 min, operator 1 min)"
    # chroot isolation runs RUN steps on the host network (pip reaches PyPI); the host's CA
    # directory is mounted for that step only, so pip trusts what the host trusts.
    (cd "$repo" && bah bud --quiet --isolation chroot --pull-never --layers=false \
        -v /etc/ssl/certs:/etc/ssl/certs:ro -f "Dockerfile.$what" -t "$image" .) >/dev/null
    save_archive "$image" "$file"
    log "$what image: done -> $file"
}

# Every code change makes new images: keep the newest few of each (the cache is shared by the
# checkouts of this machine, so another tree's current images must survive), drop the rest.
keep_images=4
prune_images() {
    local what
    for what in server operator; do
        # shellcheck disable=SC2012 # names are ours: <what>-h-<hex>.tar
        ls -1t "$cache/images/$what"-*.tar 2>/dev/null | tail -n +$((keep_images + 1)) |
            xargs -r rm -f
    done
    bah images --json | python3 -c '
import json, sys
images, keep = json.load(sys.stdin), int(sys.argv[1])
for repo in ("localhost/modeldeploy-server", "localhost/modeldeploy-operator"):
    tagged = sorted(((image["createdatraw"], name) for image in images
                     for name in image.get("names") or [] if name.rsplit(":", 1)[0] == repo),
                    reverse=True)
    for _, name in tagged[keep:]:
        print(name)
' "$keep_images" | xargs -r buildah "${buildah_store[@]}" rmi >/dev/null || true
    bah rmi --prune >/dev/null 2>&1 || true
}

build_images() {
    build_python_base
    build_project_image server "$server_image" "$server_tag"
    build_project_image operator "$operator_image" "$operator_tag"
    prune_images
}

steps=("$@")
((${#steps[@]})) || steps=(all)
mkdir -p "$cache"
for step in "${steps[@]}"; do
    started=$SECONDS
    case "$step" in
    packages) install_packages ;;
    binaries) build_binaries ;;
    base) need_root buildah; build_pause; build_python_base ;;
    images) need_root buildah; build_images ;;
    names) names; continue ;;
    all)
        install_packages
        need_root buildah
        # The Go builds use the CPUs, debootstrap and pip mostly wait on the network: overlap.
        build_binaries &
        binaries_pid=$!
        build_pause
        build_images
        wait "$binaries_pid" || { log "binaries: build failed"; exit 1; }
        ;;
    *) log "unknown step $step (packages|binaries|base|images|names|all)"; exit 2 ;;
    esac
    log "$step: $((SECONDS - started))s"
done
