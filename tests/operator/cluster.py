"""An admin-side view of one test namespace for the operator's control-plane tests: what a user,
kubectl and the missing kubelet/controllers would do, plus the assertions the tests share.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client

from modeldeploy_operator import contract, naming
from modeldeploy_operator.kube import RESOURCES
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_operator.status import ready_variants
from modeldeploy_operator.traffic import compute_effective_weights
from tests.operator.builders import model_deployment, variant
from tests.operator.harness import (
    GROUP,
    PLURAL,
    SERVER_IMAGE,
    TEST_MANAGER,
    VERSION,
    OperatorProcess,
    wait_for,
)

KINDS = {
    "Deployment": ("apps/v1", "list_namespaced_deployment"),
    "Service": ("v1", "list_namespaced_service"),
    "ServiceAccount": ("v1", "list_namespaced_service_account"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "list_namespaced_role_binding"),
    "PodDisruptionBudget": ("policy/v1", "list_namespaced_pod_disruption_budget"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "list_namespaced_horizontal_pod_autoscaler"),
}


def send(
    api: client.ApiClient, method: str, path: str, body: Any, content_type: str
) -> tuple[int, bytes]:
    """One raw API call as `api`'s user: (HTTP status, body)."""
    headers = {"Accept": "application/json", "Content-Type": content_type}
    _, url, headers, _, _ = api.param_serialize(
        method, path, header_params=headers, auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, header_params=headers, body=body)
    return response.status, response.read()  # type: ignore[no-untyped-call]


def object_path(namespace: str, kind: str, name: str) -> str:
    """The API path of the object of `kind` (one the operator renders) named `name`."""
    api_version, plural = next((v, p) for (v, k), p in RESOURCES.items() if k == kind)
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}/{name}"


class Cluster:
    """Admin-side view of one test namespace: what a user and kubectl would do."""

    def __init__(self, api: client.ApiClient, namespace: str, operator: OperatorProcess) -> None:
        self.api = api
        self.namespace = namespace
        self.operator = operator
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.apis = {
            "apps/v1": self.apps,
            "v1": self.core,
            "policy/v1": client.PolicyV1Api(api),
            "autoscaling/v2": client.AutoscalingV2Api(api),
            "rbac.authorization.k8s.io/v1": client.RbacAuthorizationV1Api(api),
        }

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any] | None:
        """One raw API call as the admin; the JSON answer, or None for 404."""
        status, data = send(self.api, method, path, body, content_type)
        if status == 404:
            return None
        assert status < 400, f"{method} {path}: {status} {data[:300]!r}"
        return cast(dict[str, Any], json.loads(data))

    def child_path(self, kind: str, name: str) -> str:
        """The API path of a child of `kind` named `name` in this namespace."""
        return object_path(self.namespace, kind, name)

    def child(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", self.child_path(kind, name))

    def edit_child(self, kind: str, name: str, patch: list[dict[str, Any]]) -> None:
        """`kubectl patch --type=json`: a JSON patch under another field manager."""
        self.request(
            "PATCH",
            self.child_path(kind, name) + "?fieldManager=kubectl-patch",
            patch,
            "application/json-patch+json",
        )

    def delete_child(self, kind: str, name: str) -> None:
        self.request("DELETE", self.child_path(kind, name))

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        obj["metadata"] = {"name": obj["metadata"]["name"]}
        return cast(
            dict[str, Any],
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, obj
            ),
        )

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as a user would (`kubectl apply --server-side`)."""
        obj = json.loads(json.dumps(obj))
        obj["metadata"] = {"name": obj["metadata"]["name"], "namespace": self.namespace}
        applied = self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            obj["metadata"]["name"],
            obj,
            field_manager=TEST_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        return cast(dict[str, Any], applied)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def get(self, name: str) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return cast(dict[str, Any], obj)

    def owned(self, md_name: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every object labelled as the operator's for `md_name`, by (kind, name)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for kind, (api_version, method) in KINDS.items():
            response = getattr(self.apis[api_version], method)(
                self.namespace,
                label_selector=naming.owned_selector(md_name),
                _preload_content=False,
            )
            for item in json.loads(response.data)["items"]:
                found[(kind, item["metadata"]["name"])] = {
                    "apiVersion": api_version,
                    "kind": kind,
                    **item,
                }
        for group, version, plural in (
            ("gateway.networking.k8s.io", "v1", "httproutes"),
            (GROUP, VERSION, contract.ROUTE_TABLE_PLURAL),
        ):
            listed = self.custom.list_namespaced_custom_object(
                group,
                version,
                self.namespace,
                plural,
                label_selector=naming.owned_selector(md_name),
            )
            for item in cast(dict[str, Any], listed)["items"]:
                found[(item["kind"], item["metadata"]["name"])] = item
        return found

    def router_identity(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The namespace's router ServiceAccount and RoleBinding that exist now, by (kind, name)."""
        found = {}
        for kind in ("ServiceAccount", "RoleBinding"):
            obj = self.child(kind, contract.ROUTER_IDENTITY)
            if obj is not None:
                found[(kind, contract.ROUTER_IDENTITY)] = obj
        return found

    def deployment(self, name: str) -> dict[str, Any]:
        # Raw JSON, as stored: the typed models would drop what they do not know.
        response: Any = self.apps.read_namespaced_deployment(
            name, self.namespace, _preload_content=False
        )
        obj: dict[str, Any] = json.loads(response.data)
        return obj

    def routes(self, md_name: str) -> dict[str, int] | None:
        """The weights the RouteTable carries; None while it is missing or hand-edited into
        something without variants."""
        table = self.child(contract.ROUTE_TABLE_KIND, naming.route_table_name(md_name))
        config = ((table or {}).get("spec") or {}).get("routes") or {}
        if "variants" not in config:
            return None
        return {v["name"]: v["weight"] for v in config["variants"]}

    def set_ready(self, deployment_name: str, ready: bool = True) -> None:
        """Play the Deployment controller: every replica updated and ready, or none."""
        deployment = self.deployment(deployment_name)
        replicas = deployment["spec"].get("replicas", 1)
        count = replicas if ready else 0
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": count,
            "availableReplicas": count,
        }
        self.apps.patch_namespaced_deployment_status(
            deployment_name,
            self.namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    def run_pod(
        self,
        name: str,
        template: Mapping[str, Any],
        status: Mapping[str, Any],
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Play the controller that owns `template` and the kubelet (the test control plane runs
        neither): pod `name` from the template (its labels, and `labels`), then its status as the
        kubelet reports it."""
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {**template["metadata"]["labels"], **(labels or {})},
            },
            "spec": template["spec"],
        }
        pods = f"/api/v1/namespaces/{self.namespace}/pods"
        self.request("POST", pods, pod)
        self.request(
            "PATCH", f"{pods}/{name}/status", {"status": status}, "application/merge-patch+json"
        )

    def set_router_endpoints(
        self, md_name: str, pods: dict[str, bool], service: Mapping[str, Any] | None = None
    ) -> None:
        """Play the EndpointSlice controller for the router Service (read now unless given, as
        from the controller's cache): one slice with the Service's labels and an owner reference
        to it, one endpoint per pod (name -> ready)."""
        service = service or self.child("Service", md_name)
        assert service is not None, f"Service/{md_name} does not exist"
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{md_name}-slice",
                "namespace": self.namespace,
                "labels": {
                    **service["metadata"].get("labels", {}),
                    naming.SERVICE_NAME_LABEL: md_name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": md_name,
                        "uid": service["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [f"10.1.0.{i + 1}"],
                    "conditions": {"ready": ready},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": self.namespace},
                }
                for i, (pod, ready) in enumerate(pods.items())
            ],
            "ports": [{"name": "http", "port": naming.SERVER_PORT, "protocol": "TCP"}],
        }
        self.request(
            "PATCH",
            f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices/"
            f"{md_name}-slice?fieldManager=endpointslice-controller&force=true",
            body,
            "application/apply-patch+yaml",
        )

    def ack_routes(self, md_name: str, pods: list[str], version: str | None = None) -> str:
        """Play the routers: each pod acknowledges routes `version` (by default the one the
        RouteTable carries now), by a JSON merge patch of its status under the router's field
        manager, as the routes contract says (a router knows the version from its watch)."""
        path = self.child_path(contract.ROUTE_TABLE_KIND, naming.route_table_name(md_name))
        if version is None:
            table = self.request("GET", path)
            assert table is not None, f"{path} does not exist"
            version = str(table["spec"]["routes"].get("version", ""))
        self.request(
            "PATCH",
            f"{path}/status?fieldManager={contract.ROUTER_FIELD_MANAGER}",
            {"status": {"acks": dict.fromkeys(pods, version)}},
            "application/merge-patch+json",
        )
        return version

    def routes_acks(self, md_name: str) -> dict[str, str]:
        """Router pod -> acknowledged routes version, as in the RouteTable's status now."""
        table = self.child(contract.ROUTE_TABLE_KIND, naming.route_table_name(md_name))
        assert table is not None, f"RouteTable {naming.route_table_name(md_name)} does not exist"
        return dict((table.get("status") or {}).get("acks") or {})

    def serve(self, md_name: str, pods: tuple[str, ...] = ("router-a", "router-b")) -> None:
        """The router Deployment ready, its pods ready endpoints serving the current routes."""
        self.set_ready(md_name)
        self.set_router_endpoints(md_name, dict.fromkeys(pods, True))
        self.ack_routes(md_name, list(pods))

    def wait_status(
        self, name: str, what: str, predicate: Any, timeout: float = 30
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.get(name).get("status") or {}
            return status if predicate(status) else None

        return wait_for(probe, what, timeout=timeout, check=self.operator.check_alive)

    def wait_child(self, kind: str, name: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(
            lambda: self.child(kind, name),
            f"{kind}/{name}",
            timeout=timeout,
            check=self.operator.check_alive,
        )

    def wait_routes(self, md_name: str, weights: dict[str, int], timeout: float = 30) -> None:
        wait_for(
            lambda: self.routes(md_name) == weights,
            f"routes {weights}",
            timeout=timeout,
            check=self.operator.check_alive,
        )

    def wait_owned(self, md_name: str, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        seen: set[tuple[str, str]] = set()

        def probe() -> dict[tuple[str, str], Any] | None:
            found = self.owned(md_name)
            seen.clear()
            seen.update(found)
            return found if set(found) == keys else None

        return wait_for(
            probe,
            lambda: f"exactly {sorted(keys)}; missing {keys - seen}, extra {seen - keys}",
            check=self.operator.check_alive,
        )

    def resyncs(self, md_name: str) -> int:
        """How many resyncs (timer-driven reconciles) the operator has logged for `md_name`."""
        marker = re.compile(rf"\[{self.namespace}/{md_name}\] reconciled generation \d+ \(resync\)")
        return len(marker.findall(self.operator.log()))

    def wait_resyncs(self, md_name: str, count: int) -> None:
        start = self.resyncs(md_name)
        wait_for(
            lambda: self.resyncs(md_name) >= start + count,
            f"{count} resyncs",
            check=self.operator.check_alive,
        )


def condition(status: dict[str, Any], type_: str) -> tuple[str, str] | None:
    for c in status.get("conditions", []):
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def expected_objects(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    """What `modeldeploy render` produces for the stored object and the observed readiness."""
    md = parse_model_deployment(cluster.get(name))
    observed = {key[1]: obj for key, obj in cluster.owned(name).items() if key[0] == "Deployment"}
    weights = compute_effective_weights(md.spec_weights, ready_variants(md, observed))
    return render_objects(md, server_image=SERVER_IMAGE, weights=weights)


def assert_contains(live: Any, rendered: Any, path: str = "") -> None:
    """`live` holds every field of `rendered` with the same value (the API server only adds
    defaults). Lists must match element by element."""
    if isinstance(rendered, dict):
        assert isinstance(live, dict), path
        for key, value in rendered.items():
            assert key in live, f"{path}.{key} missing"
            assert_contains(live[key], value, f"{path}.{key}")
    elif isinstance(rendered, list):
        assert isinstance(live, list) and len(live) == len(rendered), path
        for i, (a, b) in enumerate(zip(live, rendered, strict=True)):
            assert_contains(a, b, f"{path}[{i}]")
    else:
        assert live == rendered, f"{path}: {live!r} != {rendered!r}"


def assert_matches_render(cluster: Cluster, name: str) -> None:
    expected = expected_objects(cluster, name)
    live = cluster.owned(name)
    assert set(live) == {(o["kind"], o["metadata"]["name"]) for o in expected}
    for obj in expected:
        assert_contains(
            live[(obj["kind"], obj["metadata"]["name"])],
            obj,
            f"{obj['kind']}/{obj['metadata']['name']}",
        )


# The router pods' identity: the namespace's, owned by no ModelDeployment.
ROUTER_IDENTITY_KEYS = {
    ("ServiceAccount", contract.ROUTER_IDENTITY),
    ("RoleBinding", contract.ROUTER_IDENTITY),
}
ROUTER_KEYS = {
    ("Deployment", "iris-v1"),
    ("Service", "iris-v1"),
    ("PodDisruptionBudget", "iris-v1"),
    ("Deployment", "iris-v2"),
    ("Service", "iris-v2"),
    ("HorizontalPodAutoscaler", "iris-v2"),
    ("RouteTable", "iris-routes"),
    ("Deployment", "iris"),
    ("Service", "iris"),
    ("PodDisruptionBudget", "iris"),
}


def iris() -> dict[str, Any]:
    return model_deployment(
        variants=[
            variant("v1", 90, replicas=2),
            variant("v2", 10, autoscaling={"minReplicas": 1, "maxReplicas": 3}),
        ]
    )


@dataclass(frozen=True)
class Drift:
    """A hand edit of one child (a JSON patch) and how to tell it has been undone."""

    kind: str
    name: str
    patch: list[dict[str, Any]]
    restored: Callable[[dict[str, Any]], bool]


# One edit per kind the operator owns, each something only the operator would undo. The router
# ModelDeployment is iris(); the HTTPRoute belongs to the gateway one, gateway_iris().
DRIFTS = (
    Drift(
        "Deployment",
        "iris-v1",
        [{"op": "replace", "path": "/spec/replicas", "value": 5}],
        lambda o: o["spec"]["replicas"] == 2,
    ),
    Drift(
        "Service",
        "iris-v1",
        [{"op": "replace", "path": "/spec/ports/0/port", "value": 9090}],
        lambda o: [p["port"] for p in o["spec"]["ports"]] == [naming.SERVER_PORT],
    ),
    Drift(
        "RouteTable",
        "iris-routes",
        [{"op": "replace", "path": "/spec/routes", "value": {}}],
        lambda o: "variants" in o["spec"]["routes"],
    ),
    # The namespace's router identity: no ModelDeployment owns it, each one repairs it.
    Drift(
        "ServiceAccount",
        contract.ROUTER_IDENTITY,
        [{"op": "remove", "path": "/metadata/labels/app.kubernetes.io~1part-of"}],
        lambda o: o["metadata"]["labels"].get(naming.PART_OF_LABEL) == naming.PART_OF,
    ),
    Drift(
        "RoleBinding",
        contract.ROUTER_IDENTITY,
        [{"op": "replace", "path": "/subjects/0/name", "value": "someone-else"}],
        lambda o: [s["name"] for s in o["subjects"]] == [contract.ROUTER_IDENTITY],
    ),
    Drift(
        "PodDisruptionBudget",
        "iris",
        [{"op": "replace", "path": "/spec/maxUnavailable", "value": 0}],
        lambda o: o["spec"]["maxUnavailable"] == 1,
    ),
    Drift(
        "HorizontalPodAutoscaler",
        "iris-v2",
        [{"op": "replace", "path": "/spec/maxReplicas", "value": 9}],
        lambda o: o["spec"]["maxReplicas"] == 3,
    ),
    Drift(
        "HTTPRoute",
        "iris",
        [{"op": "replace", "path": "/spec/hostnames", "value": ["evil.example.com"]}],
        lambda o: o["spec"]["hostnames"] == ["iris.example.com"],
    ),
)


HOWS = ("delete", "edit")


def gateway_iris() -> dict[str, Any]:
    return model_deployment(
        variants=[variant("v1", 100)],
        routing={
            "mode": "gateway",
            "gateway": {"parentRefs": [{"name": "gw"}], "hostnames": ["iris.example.com"]},
        },
    )


def time_to_restore(cluster: Cluster, drift: Drift, how: str, timeout: float = 30.0) -> float:
    """Seconds from deleting (`how="delete"`) or editing the child to its restoration."""
    before = cluster.child(drift.kind, drift.name)
    assert before is not None and drift.restored(before), f"{drift.kind}/{drift.name} not ready"
    uid = before["metadata"]["uid"]
    started = time.monotonic()
    if how == "delete":
        cluster.delete_child(drift.kind, drift.name)
    else:
        cluster.edit_child(drift.kind, drift.name, drift.patch)

    def restored() -> bool:
        obj = cluster.child(drift.kind, drift.name)
        if obj is None or (how == "delete" and obj["metadata"]["uid"] == uid):
            return False
        return drift.restored(obj)

    wait_for(
        restored,
        f"{drift.kind}/{drift.name} restored after {how}",
        timeout=timeout,
        interval=0.02,
        check=cluster.operator.check_alive,
    )
    return time.monotonic() - started
