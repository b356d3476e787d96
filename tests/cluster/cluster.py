"""A real single-node Kubernetes cluster on this machine: bring it up, find it, tear it down.

    python -m tests.cluster.cluster up      # idempotent: reuses a healthy cluster
    python -m tests.cluster.cluster status  # exit 0 when up; prints the kubeconfig path
    python -m tests.cluster.cluster down    # stops by PID and removes everything it made

Pieces (built and cached by tests/cluster/build.sh): containerd + runc + CNI plugins from Debian,
etcd, kube-apiserver, kube-controller-manager (all non-cloud controllers), kube-scheduler,
kubelet, kube-proxy (iptables mode) and CoreDNS, each a process whose PID is recorded in the state
directory. Traffic stays on this machine: the apiserver, kubelet and CoreDNS listen only on a
/32 address of a host-only bridge made here, pods sit on a pod bridge made here, and a guard
chain drops anything for the cluster's addresses that would leave by another interface.
CoreDNS serves the cluster zone only and forwards nothing.

`down` stops every recorded process (by PID, checking it is still the same process), kills the
pod tasks, unmounts what the kubelet and containerd mounted, deletes the pods' network
namespaces, both bridges, every KUBE-/CNI-/MODELDEPLOY- iptables chain and the kubepods cgroups,
restores the sysctls it changed, and removes the state directory. Images stay in the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane import harness

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"

NODE_NAME = "modeldeploy-node"
# All cluster addresses sit in one /16 that this machine owns only through the interfaces below.
CLUSTER_RANGE = "10.213.0.0/16"
NODE_IP = "10.213.0.1"  # the apiserver, kubelet and CoreDNS listen here (host-only bridge)
POD_CIDR = "10.213.64.0/24"
SERVICE_CIDR = "10.213.128.0/24"
KUBERNETES_SERVICE_IP = "10.213.128.1"
CLUSTER_DOMAIN = "cluster.local"
HOST_BRIDGE = "mdhost0"
POD_BRIDGE = "mdcni0"
API_PORT = 6443
GUARD_CHAIN = "MODELDEPLOY-GUARD"
CHAIN_PREFIXES = ("KUBE-", "CNI-", "MODELDEPLOY-")
CNI_BIN_DIR = Path("/usr/lib/cni")
# Settings the cluster needs or the kubelet sets; `down` puts the old values back.
SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/bridge/bridge-nf-call-iptables": "1",
    "vm/overcommit_memory": None,
    "vm/panic_on_oom": None,
    "kernel/panic": None,
    "kernel/panic_on_oops": None,
    "kernel/keys/root_maxkeys": None,
    "kernel/keys/root_maxbytes": None,
}
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "modeldeploy-cluster"
    return Path(os.environ.get("MODELDEPLOY_CLUSTER_CACHE", default))


def state_dir() -> Path:
    return Path(os.environ.get("MODELDEPLOY_CLUSTER_STATE", "/var/lib/modeldeploy-cluster"))


class ClusterError(RuntimeError):
    """A cluster component failed to start, or a prerequisite is missing."""


# --- what must be there ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    control_plane: harness.Binaries
    kubelet: Path
    kube_proxy: Path
    kube_scheduler: Path
    kubectl: Path
    coredns: Path


def expected_binaries() -> Binaries:
    versions = harness.read_versions()
    root = harness.cache_root()
    node = root / f"kubernetes-node-{versions['KUBERNETES_VERSION']}"
    return Binaries(
        control_plane=harness.expected_binaries(),
        kubelet=node / "kubelet",
        kube_proxy=node / "kube-proxy",
        kube_scheduler=node / "kube-scheduler",
        kubectl=node / "kubectl",
        coredns=root / f"coredns-{versions['COREDNS_VERSION']}" / "coredns",
    )


def image_names() -> dict[str, str]:
    """SERVER_IMAGE, OPERATOR_IMAGE, PAUSE_IMAGE and their *_ARCHIVE paths for this tree."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "names"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


TOOLS = (
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "iptables",
    "ip6tables",
    "iptables-save",
    "conntrack",
    "ip",
    "buildah",
)


def missing_prerequisites(project_images: bool = True) -> list[str]:
    """Everything this machine lacks for the cluster suite, each named (empty: all there); the
    cluster alone needs no project image."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the cluster runs containerd, kubelet and iptables)")
    missing += [f"{tool} (tests/cluster/build.sh packages)" for tool in TOOLS if not _which(tool)]
    if not _sysctl_path("net/bridge/bridge-nf-call-iptables").exists():
        missing.append("the br_netfilter kernel module (net.bridge.bridge-nf-call-iptables)")
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append(f"CNI plugins in {CNI_BIN_DIR} (tests/cluster/build.sh packages)")
    if not _which("go"):
        missing.append("a Go toolchain >= 1.25 (to build the Kubernetes binaries)")
    binaries = expected_binaries()
    built = [
        binaries.kubelet,
        binaries.kube_proxy,
        binaries.kube_scheduler,
        binaries.kubectl,
        binaries.coredns,
    ]
    missing += [f"{p} (tests/cluster/build.sh binaries)" for p in built if not p.exists()]
    missing += [
        f"{p} (tests/controlplane/build.sh)"
        for p in harness.missing_binaries(binaries.control_plane)
    ]
    for key, path in image_names().items():
        wanted = project_images or key == "PAUSE_ARCHIVE"
        if wanted and key.endswith("_ARCHIVE") and not Path(path).exists():
            missing.append(f"{path} (tests/cluster/build.sh base images)")
    return missing


def _which(tool: str) -> bool:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return any(os.access(Path(d) / tool, os.X_OK) for d in path.split(":") if d)


# --- running commands -----------------------------------------------------------------------------


def run(*argv: str | Path, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, argv))} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_root(self) -> Path:
        # In the cache, so imported images survive a teardown.
        return cache_dir() / "containerd"

    @property
    def models(self) -> Path:
        return self.root / "models"


def ctr(paths: Paths, *args: str, check: bool = True, timeout: float = 300) -> str:
    return run(
        "ctr",
        "--address",
        paths.containerd_socket,
        "--namespace",
        "k8s.io",
        *args,
        check=check,
        timeout=timeout,
    )


# --- processes by PID -----------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat); None once it has
    exited (gone, or a zombie: reaped here when it is this process's child)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return fields[19]


_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(paths: Paths, name: str, argv: list[str]) -> dict[str, Any]:
    """Start a daemon in its own session (it outlives this process); return its PID record."""
    log = (paths.logs / f"{name}.log").open("ab")
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=paths.root,
    )
    log.close()
    # Kept, so that no Popen is collected (with a ResourceWarning) while its process runs.
    _children[popen.pid] = popen
    record = {"name": name, "pid": popen.pid, "start": _start_time(popen.pid)}
    _record_process(paths, record)
    return record


def _record_process(paths: Paths, record: dict[str, Any]) -> None:
    state = read_state(paths) or {}
    state.setdefault("processes", []).append(record)
    write_state(paths, state)


def alive(record: dict[str, Any]) -> bool:
    """The recorded process still runs (same PID and start time, so not a recycled PID)."""
    return record.get("start") is not None and _start_time(record["pid"]) == record["start"]


def stop_process(record: dict[str, Any]) -> None:
    if not alive(record):
        return
    os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(record):
        os.kill(record["pid"], signal.SIGKILL)
        while alive(record):
            time.sleep(0.05)
    child = _children.pop(record["pid"], None)
    if child is not None:
        child.wait()


def read_state(paths: Paths) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(paths.state_file.read_text())
    except (OSError, ValueError):
        return None
    return state


def write_state(paths: Paths, state: dict[str, Any]) -> None:
    tmp = paths.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(paths.state_file)


def log_tail(paths: Paths, name: str, lines: int = 25) -> str:
    try:
        text = (paths.logs / f"{name}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    paths: Paths,
    what: str,
    ready: Any,
    watched: list[dict[str, Any]],
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in watched:
            if not alive(record):
                raise ClusterError(
                    f"{record['name']} exited; last lines of its log:\n"
                    + log_tail(paths, record["name"])
                )
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.3)
    raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# --- configuration files --------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def containerd_config(paths: Paths, pause_image: str) -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return _write(
        paths.root / "containerd" / "config.toml",
        f"""\
version = 2
root = "{paths.containerd_root}"
state = "{paths.root / "containerd" / "state"}"
[grpc]
  address = "{paths.containerd_socket}"
[ttrpc]
  address = "{paths.containerd_socket}.ttrpc"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{pause_image}"
  # root here lacks CAP_SYS_RESOURCE: it may not lower oom_score_adj as kubelet asks for sandboxes
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{paths.root / "cni" / "net.d"}"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
""",
    )


def cni_config(paths: Paths) -> None:
    conflist = {
        "cniVersion": "1.0.0",
        "name": "modeldeploy",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # nothing from a pod is ever NATed towards the outside
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.root / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    _write(paths.root / "cni" / "net.d" / "10-modeldeploy.conflist", json.dumps(conflist))


def kubelet_config(paths: Paths, pki: harness.Pki, healthz_port: int) -> Path:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki.serving_cert),
        "tlsPrivateKeyFile": str(pki.serving_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki.ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        # cgroup v1 and no systemd on this kind of machine.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(_write(paths.root / "resolv.conf", "# no upstream resolver\n")),
        # Images cannot be pulled again here: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "podLogsDir": str(paths.root / "pod-logs"),  # not /var/log/pods: `down` removes it
        "serializeImagePulls": False,
        "maxPods": 40,
    }
    return _write(paths.root / "kubelet" / "config.yaml", yaml.safe_dump(config))


def kube_proxy_config(paths: Paths, healthz_port: int, metrics_port: int) -> Path:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(paths.kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "iptables": {"localhostNodePorts": False},
        # 0: leave the host's conntrack table size and timeouts as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    return _write(paths.root / "kube-proxy.yaml", yaml.safe_dump(config))


def corefile(paths: Paths, ready_port: int) -> Path:
    # The cluster zone and reverse lookups only. There is no `forward` plugin: a name outside
    # the cluster gets REFUSED, and no query ever leaves this machine.
    return _write(
        paths.root / "Corefile",
        f"""\
{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {paths.kubeconfig} admin
        pods insecure
    }}
    cache 5
}}
""",
    )


# --- host network ---------------------------------------------------------------------------------


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key


def save_and_set_sysctls(paths: Paths) -> None:
    saved = {}
    for key, value in SYSCTLS.items():
        path = _sysctl_path(key)
        if path.exists():
            saved[key] = path.read_text().strip()
            if value is not None:
                path.write_text(value)
    state = read_state(paths) or {}
    state["sysctls"] = saved
    write_state(paths, state)


def setup_network() -> None:
    run("ip", "link", "add", HOST_BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/32", "dev", HOST_BRIDGE)
    run("ip", "link", "set", HOST_BRIDGE, "up")
    # Service addresses have no interface: route them to the port-less bridge so that the first
    # route lookup (before kube-proxy's DNAT) never picks the default route.
    run("ip", "route", "add", SERVICE_CIDR, "dev", HOST_BRIDGE, "src", NODE_IP)
    # The cluster is IPv4 only: nothing for its range may leave by another interface.
    run("iptables", "-t", "filter", "-N", GUARD_CHAIN)
    for flag in ("-d", "-s"):
        for interface in (POD_BRIDGE, HOST_BRIDGE, "lo"):
            run("iptables", "-A", GUARD_CHAIN, flag, CLUSTER_RANGE, "-o", interface, "-j", "RETURN")
        run("iptables", "-A", GUARD_CHAIN, flag, CLUSTER_RANGE, "-j", "DROP")
    for chain in ("OUTPUT", "FORWARD"):
        run("iptables", "-I", chain, "1", "-j", GUARD_CHAIN)


# --- up -------------------------------------------------------------------------------------------


def up() -> dict[str, Any]:
    """Start the cluster, or return the state of the healthy one already running."""
    paths = Paths(state_dir())
    state = read_state(paths)
    if state is not None and healthy(paths, state):
        return state
    if paths.root.exists():
        down()
    missing = missing_prerequisites(project_images=False)
    if missing:
        raise ClusterError("cannot start the cluster; missing: " + "; ".join(missing))
    started = time.monotonic()
    paths.logs.mkdir(parents=True)
    paths.pki.mkdir()
    write_state(paths, {"processes": [], "kubeconfig": str(paths.kubeconfig)})
    try:
        state = _start(paths, expected_binaries(), image_names())
    except BaseException:
        down()
        raise
    state["startup_seconds"] = round(time.monotonic() - started, 1)
    write_state(paths, state)
    return state


def _start(paths: Paths, binaries: Binaries, images: dict[str, str]) -> dict[str, Any]:
    save_and_set_sysctls(paths)
    setup_network()
    pki = harness.make_pki(
        paths.pki,
        ips=("127.0.0.1", NODE_IP, KUBERNETES_SERVICE_IP),
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
        ),
    )
    server_url = f"https://{NODE_IP}:{API_PORT}"
    harness.write_kubeconfig(
        paths.kubeconfig,
        server_url,
        pki.ca_cert,
        "admin",
        {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
    )
    cni_config(paths)
    containerd = spawn(
        paths,
        "containerd",
        ["containerd", "--config", str(containerd_config(paths, images["PAUSE_IMAGE"]))],
    )
    wait_until(
        paths, "containerd", lambda: ctr(paths, "version", timeout=5) is not None, [containerd]
    )
    import_images(paths, {images["PAUSE_IMAGE"]: images["PAUSE_ARCHIVE"]})

    cp = binaries.control_plane
    etcd_port, peer_port = harness.free_port(), harness.free_port()
    etcd = spawn(
        paths, "etcd", harness.etcd_argv(cp.etcd, paths.root / "etcd", etcd_port, peer_port)
    )
    apiserver = spawn(
        paths,
        "kube-apiserver",
        [
            *harness.apiserver_argv(
                cp.kube_apiserver,
                f"http://127.0.0.1:{etcd_port}",
                pki,
                bind_address=NODE_IP,
                port=API_PORT,
                service_cidr=SERVICE_CIDR,
                issuer="https://kubernetes.default.svc",
            ),
            f"--advertise-address={NODE_IP}",
            "--authorization-mode=Node,RBAC",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            f"--kubelet-certificate-authority={pki.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP",
        ],
    )
    wait_until(
        paths, "kube-apiserver /readyz", lambda: harness.readyz(server_url, pki), [etcd, apiserver]
    )

    # The Gateway API CRDs (standard channel), as a cluster offering gateway mode has them.
    with harness.api_client_from_kubeconfig(paths.kubeconfig) as api:
        harness.install_crds(api, harness.crd_documents(cp.gateway_crds.glob("*.yaml")))

    controllers = spawn(
        paths,
        "kube-controller-manager",
        [
            str(cp.kube_controller_manager),
            f"--kubeconfig={paths.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            # Everything but what needs a cloud or a pod-CIDR allocator (the CNI plugin assigns).
            "--controllers=*,-node-ipam-controller,-cloud-node-lifecycle-controller,"
            "-service-lb-controller,-node-route-controller",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ],
    )
    scheduler = spawn(
        paths,
        "kube-scheduler",
        [
            str(binaries.kube_scheduler),
            f"--kubeconfig={paths.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
        ],
    )
    kubelet_healthz = harness.free_port()
    kubelet = spawn(
        paths,
        "kubelet",
        [
            str(binaries.kubelet),
            f"--config={kubelet_config(paths, pki, kubelet_healthz)}",
            f"--kubeconfig={paths.kubeconfig}",
            f"--root-dir={paths.root / 'kubelet'}",
            f"--cert-dir={paths.pki}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--v=1",
        ],
    )
    proxy_healthz = harness.free_port()
    proxy = spawn(
        paths,
        "kube-proxy",
        [
            str(binaries.kube_proxy),
            f"--config={kube_proxy_config(paths, proxy_healthz, harness.free_port())}",
        ],
    )
    dns_ready = harness.free_port()
    coredns = spawn(
        paths, "coredns", [str(binaries.coredns), "-conf", str(corefile(paths, dns_ready))]
    )
    everything = [containerd, etcd, apiserver, controllers, scheduler, kubelet, proxy, coredns]
    kubectl = [str(binaries.kubectl), f"--kubeconfig={paths.kubeconfig}"]
    wait_until(
        paths,
        "node Ready",
        lambda: (
            run(
                *kubectl,
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                timeout=10,
            )
            == "True"
        ),
        everything,
    )
    wait_until(
        paths,
        "ServiceAccount default/default",
        lambda: run(*kubectl, "get", "serviceaccount", "default", "-o", "name", timeout=10),
        everything,
    )
    wait_until(
        paths,
        "kube-proxy rules",
        lambda: "default/kubernetes" in run("iptables-save", "-t", "nat", timeout=10),
        everything,
    )
    wait_until(
        paths, "CoreDNS ready", lambda: _http_ok(f"http://127.0.0.1:{dns_ready}/ready"), everything
    )
    state = read_state(paths) or {}
    state.update(
        server_url=server_url,
        node_ip=NODE_IP,
        kubectl=kubectl,
        images_imported=[images["PAUSE_IMAGE"]],
    )
    return state


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def import_images(paths: Paths, archives: dict[str, str]) -> None:
    """Import docker-archive files (image name -> file) into containerd's Kubernetes namespace,
    skipping images it already has."""
    known = set(ctr(paths, "images", "list", "--quiet").split())
    for image, archive in archives.items():
        repository = image.rsplit(":", 1)[0]
        # Older builds of the same image only fill the disk (the cache keeps one per image).
        stale = [k for k in known if k.rsplit(":", 1)[0] == repository and k != image]
        if stale:
            ctr(paths, "images", "remove", "--sync", *stale)
        if image not in known:
            ctr(paths, "images", "import", archive, timeout=600)
    # The CRI also names each image it ran by its id ("sha256:..."): those of images no longer
    # tagged would keep every old build's layers forever (7 GB after a day of rebuilds).
    listed = [line.split() for line in ctr(paths, "images", "list").splitlines()[1:]]
    current = {fields[2] for fields in listed if not fields[0].startswith("sha256:")}
    orphans = [f[0] for f in listed if f[0].startswith("sha256:") and f[2] not in current]
    if orphans:
        ctr(paths, "images", "remove", "--sync", *orphans)


def healthy(paths: Paths, state: dict[str, Any]) -> bool:
    records = state.get("processes", [])
    if not records or not all(alive(r) for r in records) or "server_url" not in state:
        return False
    return harness.readyz(state["server_url"], harness.pki_paths(paths.pki))


# --- down -----------------------------------------------------------------------------------------

# Stopped first, so nothing restarts pods or rewrites rules while the rest is taken apart.
STOP_FIRST = ("kubelet", "kube-proxy", "coredns", "kube-scheduler", "kube-controller-manager")


def down() -> list[str]:
    """Stop the cluster and remove everything it made; return what was left to remove by hand
    (empty when the teardown was complete)."""
    paths = Paths(state_dir())
    state = read_state(paths) or {}
    records = state.get("processes", [])
    by_name = {r["name"]: r for r in records}
    for name in STOP_FIRST:
        if name in by_name:
            stop_process(by_name[name])
    netns: set[str] = set()
    if "containerd" in by_name and alive(by_name["containerd"]):
        netns = remove_pod_containers(paths)
    for record in reversed(records):
        stop_process(record)
    stop_shims(paths)
    unmount_under([paths.root, paths.containerd_root])
    for path in netns:
        run("ip", "netns", "delete", Path(path).name, check=False)
    for link in (POD_BRIDGE, HOST_BRIDGE):
        run("ip", "link", "delete", link, check=False)
    remove_chains()
    remove_cgroups()
    for key, value in state.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            _sysctl_path(key).write_text(value)
    for flag in ("--orig-src", "--orig-dst"):
        run("conntrack", "-D", flag, CLUSTER_RANGE, check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(paths.root)], check=False)
    return leftovers(paths)


def remove_pod_containers(paths: Paths) -> set[str]:
    """Kill and delete every container of the k8s.io namespace; return the sandboxes' netns."""
    netns = set()
    for container in ctr(paths, "containers", "list", "--quiet", check=False).split():
        with contextlib.suppress(ClusterError, ValueError):
            info = json.loads(ctr(paths, "containers", "info", container))
            for namespace in info.get("Spec", {}).get("linux", {}).get("namespaces", []):
                if namespace.get("type") == "network" and namespace.get("path"):
                    netns.add(namespace["path"])
        ctr(paths, "tasks", "kill", "--signal", "SIGKILL", container, check=False)
    for container in ctr(paths, "containers", "list", "--quiet", check=False).split():
        ctr(paths, "tasks", "delete", "--force", container, check=False)
        ctr(paths, "containers", "delete", container, check=False)
    return {path for path in netns if path.startswith(("/var/run/netns/", "/run/netns/"))}


def stop_shims(paths: Paths) -> None:
    """containerd's shims outlive it: stop those serving this cluster's containerd (found by the
    socket address on their command line, then stopped by PID)."""
    address = str(paths.containerd_socket)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if address.encode() in argv:
            pid = int(proc.name)
            stop_process({"name": "shim", "pid": pid, "start": _start_time(pid)})


def _mounts() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        points.append(point)
    return points


def unmount_under(roots: list[Path]) -> None:
    prefixes = [str(r).rstrip("/") + "/" for r in roots]
    for point in sorted(set(_mounts()), key=lambda p: p.count("/"), reverse=True):
        if any(point.startswith(prefix) for prefix in prefixes):
            run("umount", point, check=False, timeout=30)
            if point in _mounts():
                run("umount", "--lazy", point, check=False, timeout=30)


def cluster_chains(dump: str) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """From `iptables-save` output: (table, chain) of every cluster chain, and (table, rule) of
    each rule of another chain that jumps to one (the arguments `iptables -D` takes)."""
    chains, jumps = [], []
    table = ""
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and line[1:].startswith(CHAIN_PREFIXES):
            chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A "):
            rule = shlex.split(line)[1:]
            targets = [rule[i + 1] for i, word in enumerate(rule[:-1]) if word in ("-j", "-g")]
            if not rule[0].startswith(CHAIN_PREFIXES) and any(
                t.startswith(CHAIN_PREFIXES) for t in targets
            ):
                jumps.append((table, rule))
    return chains, jumps


def _cluster_chains(binary: str) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    return cluster_chains(run(f"{binary}-save", check=False))


def remove_chains() -> None:
    for binary in ("iptables", "ip6tables"):
        chains, jumps = _cluster_chains(binary)
        for table, rule in jumps:
            run(binary, "-t", table, "-D", *rule, check=False)
        for table, chain in chains:
            run(binary, "-t", table, "-F", chain, check=False)
        for table, chain in chains:
            run(binary, "-t", table, "-X", chain, check=False)


def remove_cgroups() -> None:
    """The kubelet's `kubepods` cgroup trees (cgroupfs driver), deepest first."""
    for top in Path("/sys/fs/cgroup").glob("*/kubepods*"):
        for directory, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def leftovers(paths: Paths) -> list[str]:
    """What of the cluster is still on this machine (empty after a complete teardown)."""
    left = [
        f"process {r['name']} (pid {r['pid']})"
        for r in (read_state(paths) or {}).get("processes", [])
        if alive(r)
    ]
    left += [
        f"mount {p}"
        for p in _mounts()
        if p.startswith((str(paths.root), str(paths.containerd_root)))
    ]
    links = run("ip", "-o", "link", "show", check=False)
    left += [f"link {name}" for name in (POD_BRIDGE, HOST_BRIDGE) if f" {name}:" in links]
    for binary in ("iptables", "ip6tables"):
        chains, _ = _cluster_chains(binary)
        left += [f"{binary} chain {table}/{chain}" for table, chain in chains]
    left += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/kubepods*")]
    if paths.root.exists():
        left.append(f"directory {paths.root}")
    return left


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else ""
    paths = Paths(state_dir())
    if command == "up":
        state = up()
        print(f"cluster up in {state.get('startup_seconds', 0)}s; KUBECONFIG={paths.kubeconfig}")
        return 0
    if command == "down":
        left = down()
        print("cluster down" if not left else "left behind: " + "; ".join(left))
        return 0 if not left else 1
    if command == "status":
        state = read_state(paths)
        up_now = state is not None and healthy(paths, state)
        print(f"up; KUBECONFIG={paths.kubeconfig}" if up_now else "down")
        return 0 if up_now else 1
    print("usage: python -m tests.cluster.cluster up|down|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
