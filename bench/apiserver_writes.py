"""What each child kind of a ModelDeployment costs the API server to create (issue 14).

One command (from the repository root, after tests/controlplane/build.sh):

    .venv/bin/python bench/apiserver_writes.py [--count 100] [--how apply,post]

On a fresh control plane, as the operator's ServiceAccount under the shipped RBAC: the children
of `--count` full ModelDeployments (as render_objects makes them), created kind after kind, one
request at a time, either by server-side apply (what the operator sends) or by POST, each way in
its own namespace. Per kind: kube-apiserver's and etcd's CPU per object (user + system of their
processes) and the wall time of one request. Nothing else runs on the control plane, but the
machine is shared: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from kubernetes import client  # noqa: E402

from modeldeploy_operator import naming  # noqa: E402
from modeldeploy_operator.kube import RESOURCES, KubeApi, _collection_path  # noqa: E402
from modeldeploy_operator.render import render_objects  # noqa: E402
from modeldeploy_operator.spec import parse_model_deployment  # noqa: E402
from tests.controlplane import harness  # noqa: E402
from tests.operator.builders import model_deployment, variant  # noqa: E402
from tests.operator.harness import install_operator_identity  # noqa: E402


def children(index: int, namespace: str) -> list[dict[str, Any]]:
    """The children of one full ModelDeployment (two variants behind the router)."""
    md = model_deployment(
        name=f"md{index}",
        namespace=namespace,
        variants=[variant("v1", 90), variant("v2", 10)],
        routing={"mode": "router"},
    )
    md["metadata"]["uid"] = f"00000000-0000-0000-0000-{index:012d}"
    return render_objects(parse_model_deployment(md), server_image="modeldeploy/server:bench")


def post(kube: KubeApi, obj: dict[str, Any]) -> None:
    """Create `obj` by POST under the operator's field manager (what apply would otherwise do)."""
    plural = RESOURCES[(obj["apiVersion"], obj["kind"])]
    path = _collection_path(obj["apiVersion"], plural, obj["metadata"]["namespace"])
    query = {"fieldManager": naming.FIELD_MANAGER}
    kube._request("POST", path, query, body=obj, content_type="application/json")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--how", default="apply,post", help="apply, post or both")
    args = parser.parse_args()
    hows = args.how.split(",")
    crds = sorted((REPO / "crds").glob("*.yaml"))
    with harness.running(harness.expected_binaries(), crds) as plane:
        pids = {p.name: p.popen.pid for p in plane.processes}
        apiserver, etcd = psutil.Process(pids["kube-apiserver"]), psutil.Process(pids["etcd"])
        with plane.api_client() as admin:
            for how in hows:
                namespace = client.V1Namespace(metadata=client.V1ObjectMeta(name=how))
                client.CoreV1Api(admin).create_namespace(namespace)
        api = harness.api_client_from_kubeconfig(install_operator_identity(plane, hows[0]))
        kube = KubeApi(api)
        print(f"{args.count} full ModelDeployments' children, one request at a time")
        print("kind                 how    apiserver ms  etcd ms  wall ms (per object)")
        for how in hows:
            by_kind: dict[str, list[dict[str, Any]]] = {}
            for index in range(args.count):
                for obj in children(index, how):
                    by_kind.setdefault(obj["kind"], []).append(obj)
            for kind, objects in by_kind.items():
                api_cpu, etcd_cpu, started = cpu_seconds(apiserver), cpu_seconds(etcd), time.time()
                for obj in objects:
                    kube.apply(obj) if how == "apply" else post(kube, obj)
                per = 1000 / len(objects)
                print(
                    f"{kind:20s} {how:6s} {(cpu_seconds(apiserver) - api_cpu) * per:12.1f}"
                    f" {(cpu_seconds(etcd) - etcd_cpu) * per:8.1f}"
                    f" {(time.time() - started) * per:8.1f}"
                )


if __name__ == "__main__":
    main()
