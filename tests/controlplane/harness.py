"""Start and stop a real etcd + kube-apiserver + kube-controller-manager on loopback for tests.

The binaries come from tests/controlplane/build.sh (a cache outside the repo, keyed by version).
Everything started here is a child process tracked by PID and stopped by `ControlPlane.stop`.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
VERSIONS_FILE = HERE / "versions.env"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
# Controllers a test cluster needs without kubelet or scheduler. deployment/replicaset stay off so
# tests can write Deployment status themselves (nothing would overwrite it).
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
    "root-ca-certificate-publisher-controller",
)


class ControlPlaneError(RuntimeError):
    """A control-plane process failed to start or to become ready."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    gateway_crds: Path
    prometheus: Path  # for the rollout tests (issue 12), not part of the control plane itself


def read_versions() -> dict[str, str]:
    """The pinned component versions from versions.env (KEY=VALUE lines)."""
    versions: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key] = value
    return versions


def cache_root() -> Path:
    """Where build.sh puts the binaries (same default as the script)."""
    default = Path.home() / ".cache" / "modeldeploy-controlplane"
    return Path(os.environ.get("MODELDEPLOY_CONTROLPLANE_CACHE", default))


def expected_binaries() -> Binaries:
    """Paths build.sh produces for the pinned versions, whether or not they exist yet."""
    v = read_versions()
    root = cache_root()
    k8s = root / f"kubernetes-{v['KUBERNETES_VERSION']}"
    return Binaries(
        etcd=root / f"etcd-{v['ETCD_VERSION']}" / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        gateway_crds=root / f"gateway-api-{v['GATEWAY_API_VERSION']}",
        prometheus=root / f"prometheus-{v['PROMETHEUS_VERSION']}-kubernetes-sd" / "prometheus",
    )


def start_prometheus(
    config: Path, directory: Path, host: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The pinned Prometheus serving `config` on a free port of `host`, its data and log in
    `directory`: the process and its URL."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    argv = [
        str(expected_binaries().prometheus),
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'tsdb'}",
        f"--web.listen-address={host}:{port}",
    ]
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://{host}:{port}"


def missing_binaries(binaries: Binaries) -> list[Path]:
    """The build outputs that are not there (empty when the cache is complete)."""
    files = [
        binaries.etcd,
        binaries.kube_apiserver,
        binaries.kube_controller_manager,
        binaries.prometheus,
    ]
    missing = [p for p in files if not os.access(p, os.X_OK)]
    if not (binaries.gateway_crds / ".complete").exists():
        missing.append(binaries.gateway_crds)
    return missing


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _sign(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    extensions: Iterable[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def pki_paths(directory: Path) -> Pki:
    """Where `make_pki` writes its files in `directory`."""
    return Pki(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        admin_cert=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_key=directory / "sa.key",
    )


def make_pki(
    directory: Path, ips: Iterable[str] = ("127.0.0.1",), dns: Iterable[str] = ("localhost",)
) -> Pki:
    """A throwaway CA, the apiserver's serving cert (valid for `ips` and `dns` names), an admin
    client cert and the SA signing key."""
    pki = pki_paths(directory)
    ca_key = _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modeldeploy-test-ca")])
    ca = _sign(
        ca_name,
        ca_key,
        ca_name,
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
        ],
    )
    _write_cert(ca, pki.ca_cert)

    serving_key = _new_key()
    sans = x509.SubjectAlternativeName(
        [x509.DNSName(name) for name in dns]
        + [x509.IPAddress(ipaddress.IPv4Address(ip)) for ip in ips]
    )
    serving = _sign(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        serving_key,
        ca_name,
        ca_key,
        [(sans, False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    )
    _write_cert(serving, pki.serving_cert)
    _write_key(serving_key, pki.serving_key)

    # O=system:masters is the group that bypasses RBAC: the admin of the test cluster.
    admin_key = _new_key()
    admin = _sign(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
            ]
        ),
        admin_key,
        ca_name,
        ca_key,
        [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    )
    _write_cert(admin, pki.admin_cert)
    _write_key(admin_key, pki.admin_key)

    _write_key(_new_key(), pki.sa_key)
    return pki


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if pytest itself is killed, the kernel stops the children too, so a
    # crashed session cannot leave an apiserver running on the shared machine. It fires when the
    # spawning thread exits, so start the control plane from a long-lived (the main) thread.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with code {self.popen.returncode}; last lines of {self.log}:\n"
                + self.log_tail()
            )

    def stop(self) -> None:
        """Terminate, wait, then kill: by PID, never by name."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_process(name: str, argv: list[str], log_dir: Path) -> Process:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    return Process(name, popen, log)


def wait_for(
    what: str,
    ready: Callable[[], bool],
    processes: Iterable[Process],
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Poll `ready` until it is true, failing early if a watched process has died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            process.check_running()
        if ready():
            return
        time.sleep(0.2)
    raise ControlPlaneError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def non_loopback_ipv4() -> str:
    """An IPv4 address of this host that is not loopback, for --advertise-address.

    The apiserver refuses a loopback address and, without the flag, needs a default route to pick
    one itself; nothing connects to it here (the apiserver listens on 127.0.0.1 only).
    """
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.IPv4Address(address).is_loopback:
            return address
    raise ControlPlaneError("no non-loopback IPv4 address for the apiserver to advertise")


# --- the control plane --------------------------------------------------------------------------


@dataclass
class ControlPlane:
    server_url: str
    kubeconfig_path: Path
    pki: Pki
    workdir: Path
    processes: list[Process] = field(default_factory=list)
    startup_seconds: float = 0.0

    def api_client(self) -> client.ApiClient:
        """A client acting as the admin (system:masters); close it, e.g. with `with`."""
        return api_client_from_kubeconfig(self.kubeconfig_path)

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token for ServiceAccount namespace/name from the TokenRequest API (as the kubelet
        gets one for a pod), so requests carry the ServiceAccount's real RBAC, nothing more."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        )
        with self.api_client() as api:
            response = client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, request
            )
        assert response.status is not None and response.status.token
        token: str = response.status.token
        return token

    def service_account_kubeconfig(self, namespace: str, name: str) -> str:
        """Path of a kubeconfig that authenticates as ServiceAccount namespace/name."""
        path = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        write_kubeconfig(
            path,
            self.server_url,
            self.pki.ca_cert,
            f"{namespace}-{name}",
            {"token": self.service_account_token(namespace, name)},
        )
        return str(path)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again as it was (etcd keeps everything): every watch
        on it breaks, as in a control-plane upgrade."""
        (index,) = [i for i, p in enumerate(self.processes) if p.name == "kube-apiserver"]
        old = self.processes[index]
        old.stop()
        new = start_process(old.name, [str(a) for a in old.popen.args], self.workdir)  # type: ignore[union-attr]
        self.processes[index] = new
        wait_for("kube-apiserver /readyz", lambda: readyz(self.server_url, self.pki), [new])

    def stop(self) -> None:
        """Stop every process in reverse start order and remove the working directory."""
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def api_client_from_kubeconfig(path: Path | str) -> client.ApiClient:
    """A client configured from a kubeconfig file, the way kopf and kubectl would read it."""
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(path)
    )
    return api


def write_kubeconfig(
    path: Path, server_url: str, ca_cert: Path, user: str, credentials: dict[str, str]
) -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {"server": server_url, "certificate-authority": str(ca_cert)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)


def readyz(url: str, pki: Pki) -> bool:
    """The apiserver at `url` answers /readyz with 200 (admin credentials)."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    try:
        with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def crd_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition in the given YAML files (other kinds are skipped)."""
    documents = []
    for path in sorted(paths):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                documents.append(document)
    return documents


def install_crds(
    api: client.ApiClient, documents: list[dict[str, Any]], timeout_s: float = START_TIMEOUT_S
) -> None:
    """Create the CRDs, then wait until each is Established and served through discovery."""
    extensions = client.ApiextensionsV1Api(api)
    for document in documents:
        crd = client.V1CustomResourceDefinition.from_dict(document)
        assert crd is not None
        extensions.create_custom_resource_definition(crd)
    deadline = time.monotonic() + timeout_s
    for document in documents:
        name = document["metadata"]["name"]
        group = document["spec"]["group"]
        versions = [v["name"] for v in document["spec"]["versions"] if v.get("served", True)]
        while not _crd_served(api, name, group, versions):
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not Established after {timeout_s:.0f}s")
            time.sleep(0.2)


def _crd_served(api: client.ApiClient, name: str, group: str, versions: list[str]) -> bool:
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    conditions = (crd.status.conditions if crd.status else None) or []
    if not any(c.type == "Established" and c.status == "True" for c in conditions):
        return False
    for version in versions:
        try:
            client.CustomObjectsApi(api).get_api_resources(group, version)
        except ApiException:
            return False
    return True


def start(
    binaries: Binaries, crd_paths: Iterable[Path], apiserver_flags: Sequence[str] = ()
) -> ControlPlane:
    """Start etcd, kube-apiserver (with `apiserver_flags` added) and kube-controller-manager and
    install the CRDs.

    On any failure everything already started is stopped before the error propagates.
    """
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="modeldeploy-cp-", dir=_tmpfs_or_default()))
    pki_dir = workdir / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    api_port = free_port()
    server_url = f"https://127.0.0.1:{api_port}"
    plane = ControlPlane(server_url, workdir / "admin.kubeconfig", pki, workdir)
    write_kubeconfig(
        plane.kubeconfig_path,
        server_url,
        pki.ca_cert,
        "admin",
        {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
    )
    try:
        _start_processes(plane, binaries, api_port, apiserver_flags)
        with plane.api_client() as api:
            install_crds(api, crd_documents(crd_paths))
    except BaseException:
        plane.stop()
        raise
    plane.startup_seconds = time.monotonic() - started
    return plane


def _tmpfs_or_default() -> str | None:
    # etcd fsyncs on every write; tmpfs makes that free.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def etcd_argv(etcd: Path, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    """etcd on loopback ports, without fsync (test data only)."""
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(etcd),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=default={peer_url}",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_argv(
    binary: Path,
    etcd_url: str,
    pki: Pki,
    *,
    bind_address: str,
    port: int,
    service_cidr: str,
    issuer: str,
) -> list[str]:
    """kube-apiserver flags shared by the test control plane and the real-node cluster."""
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={bind_address}",
        f"--secure-port={port}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-cluster-ip-range={service_cidr}",
        f"--service-account-issuer={issuer}",
        f"--service-account-key-file={pki.sa_key}",
        f"--service-account-signing-key-file={pki.sa_key}",
        "--allow-privileged=true",
        "--profiling=false",
    ]


def _start_processes(
    plane: ControlPlane, binaries: Binaries, api_port: int, apiserver_flags: Sequence[str]
) -> None:
    workdir, pki = plane.workdir, plane.pki
    etcd_port, peer_port = free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    etcd = start_process(
        "etcd", etcd_argv(binaries.etcd, workdir / "etcd", etcd_port, peer_port), workdir
    )
    plane.processes.append(etcd)

    apiserver_args = [
        *apiserver_argv(
            binaries.kube_apiserver,
            etcd_url,
            pki,
            bind_address="127.0.0.1",
            port=api_port,
            service_cidr="10.0.0.0/16",
            issuer=f"{plane.server_url}/",
        ),
        "--authorization-mode=RBAC",
        f"--advertise-address={non_loopback_ipv4()}",
    ]
    apiserver = start_process("kube-apiserver", [*apiserver_args, *apiserver_flags], workdir)
    plane.processes.append(apiserver)
    wait_for("kube-apiserver /readyz", lambda: readyz(plane.server_url, pki), [etcd, apiserver])

    kcm = start_process(
        "kube-controller-manager",
        [
            str(binaries.kube_controller_manager),
            f"--kubeconfig={plane.kubeconfig_path}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
        ],
        workdir,
    )
    plane.processes.append(kcm)
    # The `default` ServiceAccount is written by the serviceaccount controller: once it exists,
    # the controller-manager is running and its informers have synced.
    with plane.api_client() as api:
        wait_for(
            "kube-controller-manager (default ServiceAccount)",
            lambda: _service_account_exists(api, "default", "default"),
            plane.processes,
        )


def _service_account_exists(api: client.ApiClient, namespace: str, name: str) -> bool:
    try:
        client.CoreV1Api(api).read_namespaced_service_account(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


@contextlib.contextmanager
def running(
    binaries: Binaries, crd_paths: Iterable[Path], apiserver_flags: Sequence[str] = ()
) -> Iterator[ControlPlane]:
    """`start` as a context manager that always stops what it started."""
    plane = start(binaries, crd_paths, apiserver_flags)
    try:
        yield plane
    finally:
        plane.stop()
