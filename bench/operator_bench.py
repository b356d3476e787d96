"""Operator benchmark against the real control plane (etcd + kube-apiserver + controller-manager).

One command (from the repository root, after tests/controlplane/build.sh):

    .venv/bin/python bench/operator_bench.py [--count 200] [--shape full|minimal] [--out PATH]

The operator runs as in production (`kopf run -m modeldeploy_operator.main` under its
ServiceAccount's RBAC), without --verbose. Measured:
- apply -> children: time from creating one ModelDeployment to all of its children existing
  (repeated `--singles` times on an idle operator; min/median/max);
- bulk: `--count` ModelDeployments created back to back; wall time until every child exists and
  every status is written; then every Deployment marked ready (as the Deployment controller
  would), one ready endpoint per router Service (as the EndpointSlice controller would), each
  router acknowledging every routes version it sees (as the routers would), and the time until
  every ModelDeployment is Ready (router mode: routers serve the current routes);
- repair: for each kind the operator owns, the time from deleting, then hand-editing, one child
  to its restoration (watch-driven; the resync is an hour), with all of the above present;
- restart: the operator killed and started again; time until it has reconciled all of them
  again (its reconciles counter; a full pass with nothing to change);
- operator memory: peak and final RSS of the operator process.
Shapes: `full` is the realistic one (two variants 90/10 behind the router: 8 children, 3 of them
Services); `minimal` is one variant with routing `none` (a Deployment and a Service). Every Service
takes a ClusterIP and the test control plane's service range is 10.0.0.0/16, so the script
refuses counts that cannot fit.
The control plane, the operator and this script share the machine: numbers include contention.
Results go to bench/results/operator.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from kubernetes import client  # noqa: E402

from modeldeploy_operator import contract, naming  # noqa: E402
from tests.controlplane import harness  # noqa: E402
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
    VERSION,
    OperatorProcess,
    running_operator,
)

# shape -> (variants, routing, children per ModelDeployment, Services per ModelDeployment).
# full: 2 x (Deployment + Service) + routes ConfigMap + router Deployment, Service and PDB.
SHAPES: dict[str, tuple[list[dict[str, Any]], str, int, int]] = {
    "full": ([variant("v1", 90), variant("v2", 10)], "router", 8, 3),
    "minimal": ([variant("v1", 100)], "none", 2, 1),
}
SERVICE_IPS = 65_000  # 10.0.0.0/16 less the `kubernetes` Service and reserved addresses
LISTS = (
    ("apps/v1", "list_namespaced_deployment"),
    ("v1", "list_namespaced_service"),
    ("v1", "list_namespaced_config_map"),
    ("policy/v1", "list_namespaced_pod_disruption_budget"),
)
POLL_S = 0.05


class Bench:
    def __init__(self, api: client.ApiClient, namespace: str, shape: str) -> None:
        self.namespace = namespace
        self.variants, self.routing, self.children, _ = SHAPES[shape]
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.apis = {
            "apps/v1": self.apps,
            "v1": client.CoreV1Api(api),
            "policy/v1": client.PolicyV1Api(api),
        }

    def create(self, name: str) -> None:
        obj = model_deployment(name=name, variants=self.variants, routing={"mode": self.routing})
        obj["metadata"] = {"name": name}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, obj)

    def children_per_md(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        selector = f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
        for api_version, method in LISTS:
            listing = getattr(self.apis[api_version], method)(
                self.namespace, label_selector=selector
            )
            for item in listing.items:
                counts[item.metadata.labels[naming.MODEL_DEPLOYMENT]] += 1
        return counts

    def statuses(self) -> dict[str, dict[str, Any]]:
        listing = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        items = cast(dict[str, Any], listing)["items"]
        return {i["metadata"]["name"]: i.get("status") or {} for i in items}

    def mark_deployments_ready(self) -> int:
        selector = f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
        deployments = self.apps.list_namespaced_deployment(self.namespace, label_selector=selector)
        for d in deployments.items:
            assert d.spec is not None and d.metadata is not None and d.metadata.name
            replicas = d.spec.replicas or 1
            status = {
                "observedGeneration": d.metadata.generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            }
            self.apps.patch_namespaced_deployment_status(
                d.metadata.name,
                self.namespace,
                {"status": status},
                _content_type="application/merge-patch+json",
            )
        return len(deployments.items)

    def add_router_endpoints(self, cluster: Cluster, names: list[str]) -> None:
        for name in names:
            cluster.set_router_endpoints(name, {f"{name}-router": True})

    def play_routers(self, cluster: Cluster) -> None:
        """Each router pod acknowledges the routes version its ConfigMap carries now."""
        selector = f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},{naming.COMPONENT}=router"
        listing = self.core.list_namespaced_config_map(self.namespace, label_selector=selector)
        for config_map in listing.items:
            assert config_map.metadata is not None and config_map.metadata.labels
            name = config_map.metadata.labels[naming.MODEL_DEPLOYMENT]
            version = json.loads((config_map.data or {})[contract.ROUTES_KEY]).get("version", "")
            acks = config_map.metadata.annotations or {}
            if acks.get(f"{contract.ROUTES_ACK_ANNOTATION_PREFIX}{name}-router") != version:
                cluster.ack_routes(name, [f"{name}-router"])


def wait(what: str, done: Any, timeout: float, sample: Any) -> float:
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


def ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--singles", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "operator.json")
    args = parser.parse_args(argv)

    binaries = harness.expected_binaries()
    missing = harness.missing_binaries(binaries)
    if missing:
        print(f"missing control-plane binaries: run tests/controlplane/build.sh ({missing})")
        return 2
    crds = [*(REPO / "crds").glob("*.yaml"), *binaries.gateway_crds.glob("*.yaml")]
    services = (args.count + args.singles + 1) * SHAPES[args.shape][3]
    if services > SERVICE_IPS:
        print(f"{services} Services would not fit the control plane's {SERVICE_IPS} ClusterIPs")
        return 2
    results: dict[str, Any] = {
        "count": args.count,
        "shape": args.shape,
        "children_per_model_deployment": SHAPES[args.shape][2],
        "loadavg_before": os.getloadavg(),
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        harness.running(binaries, crds) as plane,
        plane.api_client() as api,
    ):
        namespace = "bench"
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
        )
        bench = Bench(api, namespace, args.shape)
        rss = [0]
        with running_operator(
            plane, [namespace], Path(tmp) / "operator.log", resync_seconds=3600, verbose=False
        ) as operator:

            def sample() -> None:
                operator.check_alive()
                rss[0] = max(rss[0], operator.rss_bytes())

            # Warm-up: the operator's first reconcile also pays for imports and connections.
            bench.create("warmup")
            wait(
                "warm-up",
                lambda: bench.children_per_md()["warmup"] == bench.children,
                args.timeout,
                sample,
            )
            singles = []
            for i in range(args.singles):
                name = f"single-{i}"
                start = time.monotonic()
                bench.create(name)
                wait(
                    name,
                    lambda n=name: bench.children_per_md()[n] == bench.children,
                    args.timeout,
                    sample,
                )
                singles.append(time.monotonic() - start)
            results["apply_to_children_s"] = {
                "min": min(singles),
                "median": statistics.median(singles),
                "max": max(singles),
            }
            results["rss_idle_mib"] = operator.rss_bytes() / 2**20

            names = [f"md-{i:03d}" for i in range(args.count)]
            start = created = time.monotonic()
            for name in names:
                bench.create(name)
            results["bulk_create_requests_s"] = time.monotonic() - start

            def all_children() -> bool:
                counts = bench.children_per_md()
                return all(counts[n] == bench.children for n in names)

            def all_status() -> bool:
                statuses = bench.statuses()
                return all(statuses.get(n, {}).get("observedGeneration") for n in names)

            wait("all children", all_children, args.timeout, sample)
            results["bulk_children_s"] = time.monotonic() - start
            wait("all statuses", all_status, args.timeout, sample)
            results["bulk_status_s"] = time.monotonic() - start

            cluster = Cluster(api, namespace, operator)
            routed = names if bench.routing == "router" else []
            start = time.monotonic()
            results["deployments_marked_ready"] = bench.mark_deployments_ready()
            bench.add_router_endpoints(cluster, routed)

            def sample_and_ack() -> None:
                sample()
                if routed:
                    bench.play_routers(cluster)

            wait(
                "all Ready",
                lambda: all(ready(s) for n, s in bench.statuses().items() if n in names),
                args.timeout,
                sample_and_ack,
            )
            results["bulk_ready_s"] = time.monotonic() - start
            results["bulk_create_to_ready_s"] = time.monotonic() - created
            results["rss_peak_mib"] = rss[0] / 2**20
            results["repair_s"] = measure_repairs(cluster)

            operator.kill()
            total = len(names) + args.singles + 1 + 2
            start = time.monotonic()
            operator.start()
            wait("reconciled again", lambda: reconciles(operator) >= total, args.timeout, sample)
            results["restart_reconcile_all_s"] = time.monotonic() - start
            results["rss_after_restart_mib"] = operator.rss_bytes() / 2**20
    results["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
