"""Operator benchmark against the real control plane (etcd + kube-apiserver + controller-manager).

One command (from the repository root, after tests/controlplane/build.sh):

    .venv/bin/python bench/operator_bench.py [--count 200 [1000 3000 ...]] [--shape full|minimal]

Each count runs on a fresh control plane, one after the other. The operator runs as in production
(`kopf run -m modeldeploy_operator.main` under its ServiceAccount's RBAC), without --verbose.
Measured, per count:
- apply -> children: time from creating one ModelDeployment to all of its children existing
  (repeated `--singles` times on an idle operator; min/median/max);
- bulk: `--count` ModelDeployments created back to back; wall time until every child exists and
  every status is written; then every Deployment marked ready (as the Deployment controller
  would), one ready endpoint per router Service (as the EndpointSlice controller would), each
  router acknowledging every routes version it sees (as the routers would), and the time until
  every ModelDeployment is Ready (router mode: routers serve the current routes);
- API calls: every request of the operator's ServiceAccount, from the API server's audit log, by
  verb, per phase and per reconcile (the operator's reconciles counter);
- repair: for each kind the operator owns, the time from deleting, then hand-editing, one child
  to its restoration (watch-driven; the resync is an hour), with all of the above present;
- restart: the operator killed and started again; time until it has reconciled all of them
  again (its reconciles counter), and what it wrote meanwhile (nothing is the target);
- operator memory: idle, peak and after the restart, and per ModelDeployment (with `--pods`, each
  Deployment also gets its pods, running as a kubelet reports them, when it is marked ready: in a
  cluster the operator watches every variant pod);
- with `--waves SIZE`: the bulk created SIZE at a time, each wave to all of its children before
  the next, and the seconds per 100 of each wave: the cost of 100 more as the namespace grows,
  from one run (a straight line through the waves gives it at 200 and at `--count`).
The harness itself watches (the operator's own index and informer, as the admin) instead of
listing every object on each poll, so its cost stays linear in the objects it sees.
Shapes: `full` is the realistic one (two variants 90/10 behind the router: 8 children, 3 of them
Services, of which only the router's has a ClusterIP: the variants' are headless); `minimal` is one
variant with routing `none` (a Deployment and a Service with a ClusterIP). ClusterIPs come from the
test control plane's 10.0.0.0/16: at most about 65,000 full ModelDeployments, or 65,000 minimal
ones; the script refuses counts that cannot fit.
`--operator-path DIR` runs the operator from another source tree (e.g. `git archive REF operator |
tar -x -C DIR` and DIR/operator) to compare code versions in one sitting.
The control plane, the operator and this script share the machine: numbers include contention.
Results go to bench/results/operator.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from kubernetes import client, config  # noqa: E402

from modeldeploy_operator import naming  # noqa: E402
from modeldeploy_operator.index import Index  # noqa: E402
from modeldeploy_operator.informer import NamespaceInformer  # noqa: E402
from modeldeploy_operator.kube import KubeApi  # noqa: E402
from modeldeploy_operator.readiness import route_table_key, routes_acks  # noqa: E402
from modeldeploy_operator.render import render_objects  # noqa: E402
from modeldeploy_operator.spec import parse_model_deployment  # noqa: E402
from tests.controlplane import harness  # noqa: E402
from tests.operator.audit import Audit, audit_flags, operator_user  # noqa: E402
from tests.operator.builders import model_deployment, variant  # noqa: E402
from tests.operator.cluster import (  # noqa: E402
    DRIFTS,
    HOWS,
    ROUTER_KEYS,
    Cluster,
    gateway_iris,
    iris,
    time_to_restore,
)
from tests.operator.harness import (  # noqa: E402
    GROUP,
    PLURAL,
    SERVER_IMAGE,
    VERSION,
    OperatorProcess,
    running_operator,
)

# shape -> (variants, routing, ClusterIPs per ModelDeployment).
SHAPES: dict[str, tuple[list[dict[str, Any]], str, int]] = {
    "full": ([variant("v1", 90), variant("v2", 10)], "router", 1),
    "minimal": ([variant("v1", 100)], "none", 1),
}
SERVICE_IPS = 65_000  # 10.0.0.0/16 less the `kubernetes` Service and reserved addresses
NAMESPACE = "bench"
POLL_S = 0.1
# The Deployment controller, the EndpointSlice controller and the routers the harness plays work
# in parallel, as in a cluster (client-go controllers run 5 workers by default, every router pod
# acks on its own): one thread making every request in turn would time the harness, not the
# operator.
PLAYERS = 8


class Tracker:
    """What the cluster holds, from watches: the operator's Index fed by its informer (as admin).

    Each event re-checks only the ModelDeployment it concerns, so following N of them costs the
    harness O(events), not O(N) per poll.
    """

    def __init__(self, api: KubeApi, children: int) -> None:
        self.index = Index()
        self.expected_children = children
        self.with_children: set[str] = set()
        self.with_status: set[str] = set()
        self.ready: set[str] = set()
        self.routes: dict[str, str] = {}  # ModelDeployment -> routes version not acked yet
        self._lock = threading.Lock()
        self._informer = NamespaceInformer(api, NAMESPACE, self, lambda deliver: deliver())

    def __enter__(self) -> Tracker:
        self._informer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._informer.stop()

    def replaced(self, kind: str, namespace: str, objects: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            for key in self.index.replace(kind, namespace, objects):
                self._refresh(key[1])

    def changed(self, kind: str, type_: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            key = self.index.update(kind, type_, obj)
            if key is not None:
                self._refresh(key[1])

    def done(self, which: set[str], names: set[str]) -> bool:
        with self._lock:
            return names <= which

    def unacked(self) -> dict[str, str]:
        with self._lock:
            return dict(self.routes)

    def _refresh(self, name: str) -> None:
        snapshot = self.index.snapshot((NAMESPACE, name))
        status = (snapshot.model_deployment.get("status") or {}) if snapshot else {}
        children = snapshot.children if snapshot else ()
        for which, holds in (
            (self.with_children, len(children) == self.expected_children),
            (self.with_status, bool(status.get("observedGeneration"))),
            (self.ready, ready(status)),
        ):
            if holds:
                which.add(name)
            else:
                which.discard(name)
        self.routes.pop(name, None)
        for obj in children:
            meta = obj["metadata"]
            if (obj["kind"], meta["name"]) == route_table_key(name):
                version = obj["spec"]["routes"].get("version", "")
                if routes_acks(obj).get(f"{name}-router") != version:
                    self.routes[name] = version


def children_per_model_deployment(shape: str) -> int:
    sample = manifest("sample", shape)
    sample["metadata"].update(namespace=NAMESPACE, uid="sample", generation=1)
    return len(render_objects(parse_model_deployment(sample), server_image=SERVER_IMAGE))


def manifest(name: str, shape: str) -> dict[str, Any]:
    variants, routing, _ = SHAPES[shape]
    obj = model_deployment(name=name, variants=variants, routing={"mode": routing})
    obj["metadata"] = {"name": name}
    return obj


class Bench:
    def __init__(
        self,
        api: client.ApiClient,
        shape: str,
        tracker: Tracker,
        players: ThreadPoolExecutor,
        pods: bool,
    ) -> None:
        self.api = api
        self.shape = shape
        self.routing = SHAPES[shape][1]
        self.tracker = tracker
        self.custom = client.CustomObjectsApi(api)
        self.acked: dict[str, str] = {}
        self.players = players
        self.pods = pods

    def create(self, name: str) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, manifest(name, self.shape)
        )

    def all_children(self, names: set[str]) -> bool:
        return self.tracker.done(self.tracker.with_children, names)

    def all_status(self, names: set[str]) -> bool:
        return self.tracker.done(self.tracker.with_status, names)

    def all_ready(self, names: set[str]) -> bool:
        return self.tracker.done(self.tracker.ready, names)

    def mark_deployments_ready(self, cluster: Cluster) -> int:
        """Every Deployment's replicas ready and available, as the Deployment controller would
        report them (raw requests: the typed client's models would cost the harness more CPU
        than the operator spends)."""
        selector = f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
        listing = cluster.request("GET", f"{path}?labelSelector={selector}")
        assert listing is not None

        def mark(d: Mapping[str, Any]) -> None:
            replicas = d["spec"].get("replicas", 1)
            if self.pods:
                # As its ReplicaSet and the kubelet would: the operator watches every variant pod.
                template = d["spec"]["template"]
                for i in range(replicas):
                    name = f"{d['metadata']['name']}-{i:05x}"
                    cluster.run_pod(name, template, kubelet_status(template["spec"], name))
            status = {
                "observedGeneration": d["metadata"]["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            }
            cluster.request(
                "PATCH",
                f"{path}/{d['metadata']['name']}/status",
                {"status": status},
                "application/merge-patch+json",
            )

        list(self.players.map(mark, listing["items"]))
        return len(listing["items"])

    def add_router_endpoints(self, cluster: Cluster, names: Sequence[str]) -> None:
        """One ready endpoint (pod `<name>-router`) behind each router Service in `names`."""

        def add(name: str) -> None:
            # The Service as the watch brought it, as the EndpointSlice controller's cache has it.
            service = self.tracker.index.get("Service", NAMESPACE, name)
            cluster.set_router_endpoints(name, {f"{name}-router": True}, service)

        list(self.players.map(add, names))

    def play_routers(self, cluster: Cluster) -> None:
        """Each router pod acknowledges the routes version its RouteTable carries now, as known
        from the watch (as a router knows it)."""
        news = [(n, v) for n, v in self.tracker.unacked().items() if self.acked.get(n) != v]

        def ack(news: tuple[str, str]) -> None:
            cluster.ack_routes(news[0], [f"{news[0]}-router"], news[1])

        list(self.players.map(ack, news))
        self.acked.update(news)


def kubelet_status(spec: Mapping[str, Any], pod_name: str) -> dict[str, Any]:
    """A running pod's status as a kubelet (1.35) reports it (the real-cluster suite's pods show
    the same fields: tests/operator/golden/variant_pod_running.json)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def container(c: Mapping[str, Any], state: dict[str, Any], started: bool) -> dict[str, Any]:
        return {
            "name": c["name"],
            "image": c["image"],
            "imageID": f"{c['image']}@sha256:{'0' * 64}",
            "containerID": f"containerd://{pod_name}-{c['name']}",
            "ready": True,
            "started": started,  # a finished init container is ready and no longer started
            "restartCount": 0,
            "state": state,
            "lastState": {},
            "volumeMounts": [
                {**m, "recursiveReadOnly": "Disabled"} if m.get("readOnly") else m
                for m in c.get("volumeMounts", [])
            ],
            "resources": c.get("resources", {}),
        }

    done = {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}
    conditions = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    return {
        "observedGeneration": 1,
        "phase": "Running",
        "conditions": [
            {
                "type": t,
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now,
                "observedGeneration": 1,
            }
            for t in conditions
        ],
        "hostIP": "10.1.0.1",
        "hostIPs": [{"ip": "10.1.0.1"}],
        "podIP": "10.2.0.2",
        "podIPs": [{"ip": "10.2.0.2"}],
        "startTime": now,
        "initContainerStatuses": [
            container(c, {"terminated": done}, False) for c in spec.get("initContainers", [])
        ],
        "containerStatuses": [
            container(c, {"running": {"startedAt": now}}, True) for c in spec["containers"]
        ],
    }


def wait(what: str, done: Callable[[], bool], timeout: float, sample: Callable[[], None]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        sample()
        if done():
            return time.monotonic() - start
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} not done after {timeout}s")


def measure_repairs(cluster: Cluster) -> dict[str, dict[str, float]]:
    """Seconds to restore each owned kind after a delete and after a hand edit."""
    cluster.create(iris())
    gateway = gateway_iris()
    gateway["metadata"]["name"] = "gw-iris"
    cluster.create(gateway)
    cluster.wait_owned("iris", ROUTER_KEYS)
    cluster.wait_child("HTTPRoute", "gw-iris")
    repairs: dict[str, dict[str, float]] = {}
    for drift in DRIFTS:
        if drift.kind == "HTTPRoute":
            drift = dataclasses.replace(drift, name="gw-iris")
        repairs[drift.kind] = {how: time_to_restore(cluster, drift, how) for how in HOWS}
    return repairs


def reconciles(operator: OperatorProcess) -> float:
    """Reconciles this operator process finished, from its metrics (0 until it serves them)."""
    try:
        text = operator.metrics()
    except OSError:
        return 0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("modeldeploy_operator_reconciles_total{")
    )


def ready(status: Mapping[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def calls(audit: Audit, reconciled: float) -> dict[str, Any]:
    """The operator's requests since the audit's mark, by verb, in all and per reconcile."""
    verbs = audit.verbs()
    return {
        "reconciles": reconciled,
        "requests_by_verb": dict(sorted(verbs.items())),
        "per_reconcile_by_verb": {
            v: round(n / reconciled, 2) for v, n in sorted(verbs.items()) if reconciled
        },
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds each process spent between marks: where a phase's time goes."""

    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        self._pids = pids
        self._start: dict[str, float] = {}

    def reading(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self._pids().items()}

    def mark(self) -> None:
        self._start = self.reading()

    def spent(self, since: Mapping[str, float] | None = None) -> dict[str, float]:
        start = self._start if since is None else since
        now = self.reading()
        return {name: round(now[name] - start.get(name, 0.0), 2) for name in now}


def admin_client(plane: harness.ControlPlane) -> client.ApiClient:
    """The admin's client, with a connection for each thread of the harness."""
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(plane.kubeconfig_path), client_configuration=configuration
    )
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def run_count(
    binaries: harness.Binaries, crds: list[Path], count: int, args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {"count": count, "loadavg_before": os.getloadavg()}
    env = {"PYTHONPATH": str(args.operator_path)} if args.operator_path else {}
    timeout = args.timeout or 120 + 0.3 * count
    with tempfile.TemporaryDirectory() as tmp:
        flags, audit = audit_flags(Path(tmp), operator_user(NAMESPACE))
        with (
            harness.running(binaries, crds, flags) as plane,
            admin_client(plane) as api,
        ):
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE))
            )
            watch_api = KubeApi(admin_client(plane))
            with (
                Tracker(watch_api, children_per_model_deployment(args.shape)) as tracker,
                running_operator(
                    plane,
                    [NAMESPACE],
                    Path(tmp) / "operator.log",
                    resync_seconds=3600,
                    verbose=False,
                    env=env,
                ) as operator,
                ThreadPoolExecutor(PLAYERS, thread_name_prefix="player") as players,
            ):
                cpu = Cpu(
                    lambda: {
                        "operator": operator.pid,
                        **{p.name: p.popen.pid for p in plane.processes},
                        "bench": os.getpid(),
                    }
                )
                bench = Bench(api, args.shape, tracker, players, args.pods)
                results.update(run_phases(bench, operator, audit, cpu, count, timeout, args))
            watch_api.close()
    results["loadavg_after"] = os.getloadavg()
    return results


def run_phases(
    bench: Bench,
    operator: OperatorProcess,
    audit: Audit,
    cpu: Cpu,
    count: int,
    timeout: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["children_per_model_deployment"] = bench.tracker.expected_children
    rss = [0]

    def sample() -> None:
        operator.check_alive()
        rss[0] = max(rss[0], operator.rss_bytes())

    # Warm-up: the operator's first reconcile also pays for imports and connections.
    bench.create("warmup")
    wait("warm-up", lambda: bench.all_children({"warmup"}), timeout, sample)
    singles = []
    for i in range(args.singles):
        name = f"single-{i}"
        start = time.monotonic()
        bench.create(name)
        wait(name, lambda n=name: bench.all_children({n}), timeout, sample)  # type: ignore[misc]
        singles.append(time.monotonic() - start)
    if singles:
        results["apply_to_children_s"] = {
            "min": min(singles),
            "median": statistics.median(singles),
            "max": max(singles),
        }
    time.sleep(1)
    rss_idle = operator.rss_bytes()
    results["rss_idle_mib"] = rss_idle / 2**20

    names = [f"md-{i:05d}" for i in range(count)]
    wanted = set(names)
    audit.mark()
    cpu.mark()
    before = reconciles(operator)
    start = created = time.monotonic()
    if args.waves:
        results["waves"] = create_in_waves(bench, names, args.waves, cpu, timeout, sample)
        results["waves_per_100_s"] = wave_growth(results["waves"], count)
    else:
        for name in names:
            bench.create(name)
        results["bulk_create_requests_s"] = time.monotonic() - start
    wait("all children", lambda: bench.all_children(wanted), timeout, sample)
    results["bulk_children_s"] = time.monotonic() - start
    wait("all statuses", lambda: bench.all_status(wanted), timeout, sample)
    results["bulk_status_s"] = time.monotonic() - start
    results["bulk_calls"] = calls(audit, reconciles(operator) - before)
    results["bulk_cpu_s"] = cpu.spent()

    cluster = Cluster(bench.api, NAMESPACE, operator)
    routed = names if bench.routing == "router" else []
    audit.mark()
    cpu.mark()
    before = reconciles(operator)
    start = time.monotonic()
    results["deployments_marked_ready"] = bench.mark_deployments_ready(cluster)
    bench.add_router_endpoints(cluster, routed)
    results["ready_marks_s"] = time.monotonic() - start

    def sample_and_ack() -> None:
        sample()
        if routed:
            bench.play_routers(cluster)

    wait("all Ready", lambda: bench.all_ready(wanted), timeout, sample_and_ack)
    results["bulk_ready_s"] = time.monotonic() - start
    results["bulk_create_to_ready_s"] = time.monotonic() - created
    results["ready_calls"] = calls(audit, reconciles(operator) - before)
    results["ready_cpu_s"] = cpu.spent()
    results["rss_peak_mib"] = rss[0] / 2**20
    if not args.no_repair:
        results["repair_s"] = measure_repairs(cluster)

    if args.no_restart:
        return results
    total = len(names) + args.singles + 1 + (0 if args.no_repair else 2)
    operator.kill()
    audit.mark()
    start = time.monotonic()
    operator.start()
    cpu.mark()
    wait("reconciled again", lambda: reconciles(operator) >= total, timeout, sample)
    results["restart_reconcile_all_s"] = time.monotonic() - start
    time.sleep(1)  # a write that follows the last counted reconcile would show here
    results["restart_calls"] = calls(audit, reconciles(operator))
    results["restart_writes"] = sum(audit.writes().values())
    results["restart_cpu_s"] = cpu.spent()
    rss_after = operator.rss_bytes()
    results["rss_after_restart_mib"] = rss_after / 2**20
    results["rss_per_model_deployment_kib"] = (rss_after - rss_idle) / 1024 / total
    return results


def create_in_waves(
    bench: Bench,
    names: Sequence[str],
    size: int,
    cpu: Cpu,
    timeout: float,
    sample: Callable[[], None],
) -> list[dict[str, Any]]:
    """Grow the namespace `size` ModelDeployments at a time, each wave to all of its children
    before the next starts: what 100 more cost with 0, `size`, 2 x `size`... present, measured in
    one run, so the machine's drift between runs does not enter the comparison."""
    waves = []
    for first in range(0, len(names), size):
        wave = names[first : first + size]
        cpu_before = cpu.reading()
        start = time.monotonic()
        for name in wave:
            bench.create(name)
        wave_done = functools.partial(bench.all_children, set(wave))
        wait(f"children of wave {first}", wave_done, timeout, sample)
        spent = cpu.spent(cpu_before)
        waves.append(
            {
                "present": first,
                "count": len(wave),
                "children_s": round(time.monotonic() - start, 3),
                "cpu_ms_per_model_deployment": {
                    name: round(1000 * seconds / len(wave), 1) for name, seconds in spent.items()
                },
            }
        )
    return waves


def wave_growth(waves: Sequence[Mapping[str, Any]], count: int) -> dict[str, float]:
    """Seconds per 100 at 200 and at `count` present, from a least-squares line through every
    wave (one wave is noisy: a few seconds on a shared machine), and the growth between them."""
    present = [w["present"] + w["count"] / 2 for w in waves]
    per_100 = [100 * w["children_s"] / w["count"] for w in waves]
    slope, intercept = statistics.linear_regression(present, per_100)
    at_200, at_count = intercept + slope * 200, intercept + slope * count
    return {
        "fit_at_200": round(at_200, 3),
        f"fit_at_{count}": round(at_count, 3),
        "growth": round(at_count / at_200 - 1, 3),
        "first_wave": round(per_100[0], 3),
        "last_wave": round(per_100[-1], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, nargs="+", default=[200])
    parser.add_argument("--singles", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full")
    parser.add_argument("--timeout", type=float, default=0.0, help="per wait; 0: 120 s + 0.3 s/MD")
    parser.add_argument("--no-repair", action="store_true", help="skip the per-kind repair runs")
    parser.add_argument(
        "--no-restart", action="store_true", help="skip the restart (code without its metrics)"
    )
    parser.add_argument(
        "--pods",
        action="store_true",
        help="give each Deployment its pods when it is marked ready (as its ReplicaSet and the "
        "kubelet would): the operator watches the variant pods",
    )
    parser.add_argument("--operator-path", type=Path, help="import the operator from here")
    parser.add_argument(
        "--waves",
        type=int,
        default=0,
        help="create the ModelDeployments this many at a time, each wave to all of its children "
        "before the next (cost per 100 as the namespace grows, in one run); 0: all at once",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "operator.json")
    args = parser.parse_args(argv)

    binaries = harness.expected_binaries()
    missing = harness.missing_binaries(binaries)
    if missing:
        print(f"missing control-plane binaries: run tests/controlplane/build.sh ({missing})")
        return 2
    crds = [*(REPO / "crds").glob("*.yaml"), *binaries.gateway_crds.glob("*.yaml")]
    for count in args.count:
        addresses = (count + args.singles + 3) * SHAPES[args.shape][2]
        if addresses > SERVICE_IPS:
            print(f"{addresses} ClusterIPs would not fit the control plane's {SERVICE_IPS}")
            return 2
    runs = []
    for count in args.count:
        runs.append(run_count(binaries, crds, count, args))
        print(json.dumps(runs[-1], indent=2), flush=True)
    results: dict[str, Any] = {"shape": args.shape, "runs": runs}
    if len(runs) > 1:
        # Seconds per 100 ModelDeployments: flat when the cost is linear.
        results["per_100_s"] = {
            str(r["count"]): {
                phase: round(100 * r[key] / r["count"], 2)
                for phase, key in (
                    ("children", "bulk_children_s"),
                    ("ready", "bulk_ready_s"),
                    ("restart", "restart_reconcile_all_s"),
                )
                if key in r
            }
            for r in runs
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
