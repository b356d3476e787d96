"""Every object a ModelDeployment wants, as plain dicts: the one rendering path, shared by the
operator and `modeldeploy render`.

Rendering is deterministic (same input, same dicts, same order) so that server-side apply of an
unchanged ModelDeployment is a no-op: no new generation, no pod restart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from modeldeploy_operator import naming
from modeldeploy_operator.contract import (
    MAX_MODEL_BYTES,
    POD_NAME_ENV,
    ROUTE_TABLE_API_VERSION,
    ROUTE_TABLE_ENV,
    ROUTE_TABLE_KIND,
    ROUTER_DEFAULT_TIMEOUT_S,
    ROUTER_IDENTITY,
    ROUTER_SHADOW_LOG_ENV,
    ROUTER_SHADOW_LOG_MAX_BYTES_ENV,
    ROUTER_TIMEOUT_ENV,
    SHUTDOWN_DELAY_S,
)
from modeldeploy_operator.spec import (
    KIND,
    MODEL_DEPLOYMENT_API_VERSION,
    ModelDeployment,
    PodSettings,
    ServerSettings,
    Shadow,
    Variant,
)
from modeldeploy_operator.traffic import compute_effective_weights

Manifest = dict[str, Any]

MODEL_DIR = "/models"
MODEL_PATH = f"{MODEL_DIR}/model.onnx"
MODEL_SOURCE_DIR = "/model-source"
ROUTER_REPLICAS = 2
# kube-proxy programs a new endpoint up to a sync period after its EndpointSlice says ready (about
# a second, more under load), and until then the Service refuses connections. A router pod counts
# as available only after this long, and the ModelDeployment's Ready waits for an available one.
ROUTER_MIN_READY_SECONDS = 5
# The server image runs as this numeric user; numeric so `runAsNonRoot` can be verified.
RUN_AS_USER = 65532
ROUTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
# SIGTERM reaches a pod while it is still being removed from Service endpoints and gateway
# backends: it keeps serving this long first, so a rollout or scale-down refuses no request.
PRESTOP_SLEEP_SECONDS = 5
# How long each process may drain in-flight requests after SIGTERM: the server waits up to its
# request timeout (30 s unless the variant sets one), the router up to its own drain limit.
SERVER_DEFAULT_DRAIN_SECONDS = 30
ROUTER_DRAIN_SECONDS = 25
# Beyond preStop + drain, before the kubelet's SIGKILL.
SHUTDOWN_MARGIN_SECONDS = 5

# Without routing.timeoutSeconds the router waits for a variant at least this much longer than
# the variant's own request timeout, so that the variant's answer (even its own 504) gets through.
ROUTER_TIMEOUT_MARGIN_SECONDS = 5
# The router's sampled log of disagreeing shadow answers (with routing.shadow, router mode): on
# an emptyDir, as the root filesystem is read-only. It rotates at SHADOW_LOG_MAX_BYTES and keeps
# one old file, and no line is longer than a quarter of that (the router leaves the payloads out
# of longer ones), so the two files take at most 2 x 1.25 x 8 MiB = 20 MiB: the volume's limit
# leaves room above that, since the kubelet evicts a pod whose emptyDir outgrows its sizeLimit.
SHADOW_LOG_DIR = "/var/log/modeldeploy"
SHADOW_LOG_FILE = "shadow-disagreements.jsonl"
SHADOW_LOG_MAX_BYTES = 8 << 20
SHADOW_LOG_VOLUME_LIMIT = "32Mi"

WARMUP_EXAMPLE_ENV = "MODELDEPLOY_WARMUP_EXAMPLE"
# ServerSettings field -> `modeldeploy-server serve` env var, in rendering order.
SERVER_ENV: tuple[tuple[str, str], ...] = (
    ("max_batch_size", "MODELDEPLOY_MAX_BATCH_SIZE"),
    ("max_batch_delay_ms", "MODELDEPLOY_MAX_BATCH_DELAY_MS"),
    ("intra_op_threads", "MODELDEPLOY_INTRA_OP_THREADS"),
    ("max_request_bytes", "MODELDEPLOY_MAX_REQUEST_BYTES"),
    ("max_rows", "MODELDEPLOY_MAX_ROWS"),
    ("request_timeout_seconds", "MODELDEPLOY_REQUEST_TIMEOUT_S"),
)


def render_objects(
    md: ModelDeployment,
    *,
    server_image: str,
    weights: Mapping[str, int] | None = None,
    mirror: Shadow | None = None,
) -> list[Manifest]:
    """All desired objects, variant by variant, then routing.

    `weights` is the traffic plan (effective weights by variant, see traffic.py). None (offline
    rendering, no cluster to observe) renders the spec's split as if every variant were Ready.
    `mirror` replaces spec.routing.shadow in the routes (a rollout's shadow step).
    """
    image = md.pod.image or server_image
    objects: list[Manifest] = []
    for variant in md.variants:
        name = naming.variant_object_name(md.name, variant.name)
        selector = naming.variant_selector(md.name, variant.name)
        labels = naming.variant_labels(md.name, variant.name, variant.model.sha256)
        objects.append(render_variant_deployment(md, variant, image))
        # Behind the router a variant's Service is headless: the router picks among its pods'
        # addresses itself (upstream.Pool.connect), and a ClusterIP per variant would cost the
        # cluster an address and the API server an allocation that scans every one allocated.
        headless = md.routing.mode == "router"
        objects.append(_service(md, name, selector, labels, naming.SERVER_PORT, headless=headless))
        if variant.min_replicas > 1:
            objects.append(_pod_disruption_budget(md, name, selector, labels))
        if variant.autoscaling is not None:
            objects.append(_horizontal_pod_autoscaler(md, variant))
    if weights is None:
        weights = compute_effective_weights(md.spec_weights, [v.name for v in md.variants])
    if md.routing.mode == "router":
        objects.extend(_router_objects(md, image, weights, mirror))
    elif md.routing.mode == "gateway":
        objects.append(_http_route(md, weights))
    return objects


def render_routes_config(
    md: ModelDeployment,
    weights: Mapping[str, int],
    urls: Mapping[str, str] | None = None,
    mirror: Shadow | None = None,
) -> dict[str, Any]:
    """The router's routes.json (the contract in the team brief), with effective weights.

    Each variant is reached at its Service unless `urls` says otherwise (local mode). `version`
    is a hash of the rest: the same routes always carry the same version, which the routers
    acknowledge once they serve with them.
    """
    routes: dict[str, Any] = {
        "model": md.name,
        "headerOverride": md.routing.header_override,
    }
    if md.routing.sticky_header is not None:
        routes["stickyHeader"] = md.routing.sticky_header
    if md.uid is not None:
        routes["probeToken"] = naming.probe_token(md.uid)
    shadow = mirror or md.routing.shadow
    if shadow is not None:
        routes["shadow"] = {"variant": shadow.variant, "percent": shadow.percent}
        if shadow.tolerance is not None:
            routes["shadow"]["tolerance"] = shadow.tolerance
    routes["variants"] = [
        {
            "name": v.name,
            "url": (
                urls[v.name]
                if urls is not None
                else naming.variant_service_url(md.name, v.name, md.namespace)
            ),
            "weight": weights[v.name],
        }
        for v in md.variants
    ]
    return {"version": routes_version(routes), **routes}


def routes_version(routes: Mapping[str, Any]) -> str:
    """The content hash of routes (without their version): 16 hex digits of a sha256."""
    canonical = json.dumps(routes, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def render_variant_deployment(md: ModelDeployment, variant: Variant, image: str) -> Manifest:
    labels = naming.variant_labels(md.name, variant.name, variant.model.sha256)
    volumes: list[Manifest] = [
        {"name": "models", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    fetch_mounts: list[Manifest] = [
        {"name": "models", "mountPath": MODEL_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    source = variant.model.uri
    if variant.model.scheme == "pvc":
        claim, path = variant.model.pvc_claim_and_path
        claim_source = {"claimName": claim, "readOnly": True}
        volumes.append({"name": "model-source", "persistentVolumeClaim": claim_source})
        fetch_mounts.append(
            {"name": "model-source", "mountPath": MODEL_SOURCE_DIR, "readOnly": True}
        )
        source = f"{MODEL_SOURCE_DIR}/{path}"
    fetch = {
        "name": "fetch-model",
        "image": image,
        "command": ["modeldeploy-server"],
        "args": [
            "fetch",
            source,
            MODEL_PATH,
            "--sha256",
            variant.model.sha256,
            "--max-bytes",
            str(MAX_MODEL_BYTES),
        ],
        # Same resources as the server: a pod's request is the max of init and main, so this
        # costs nothing extra and satisfies quotas that demand limits on every container.
        **({"resources": copy.deepcopy(variant.resources)} if variant.resources else {}),
        "securityContext": container_security_context(),
        "volumeMounts": fetch_mounts,
        # Its error (a sha256 mismatch, an unreachable URI) becomes the pod's termination message,
        # which the operator reads into the ModelDeployment's Degraded condition.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    server = {
        "name": "server",
        "image": image,
        "command": ["modeldeploy-server"],
        "args": ["serve"],
        "env": _server_env(md, variant),
        "ports": [{"name": "http", "containerPort": naming.SERVER_PORT, "protocol": "TCP"}],
        **_probes(),
        **_pre_stop(),
        **({"resources": copy.deepcopy(variant.resources)} if variant.resources else {}),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "models", "mountPath": MODEL_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    spec: Manifest = {}
    if variant.autoscaling is None:
        # With autoscaling the HPA owns `replicas`; leaving it out means we never fight it.
        spec["replicas"] = variant.replicas
    spec["selector"] = {"matchLabels": naming.variant_selector(md.name, variant.name)}
    spec["template"] = {
        "metadata": {
            "labels": {**(md.pod.labels or {}), **labels},
            "annotations": _pod_annotations(md),
        },
        "spec": render_pod_spec(
            md.pod,
            init_containers=[fetch],
            containers=[server],
            volumes=volumes,
            drain_seconds=math.ceil(
                variant.server.request_timeout_seconds or SERVER_DEFAULT_DRAIN_SECONDS
            ),
        ),
    }
    return _object(
        md, "apps/v1", "Deployment", naming.variant_object_name(md.name, variant.name), labels, spec
    )


def _server_env(md: ModelDeployment, variant: Variant) -> list[Manifest]:
    env = [
        ("MODELDEPLOY_MODEL_PATH", MODEL_PATH),
        ("MODELDEPLOY_MODEL_NAME", md.name),
        ("MODELDEPLOY_MODEL_VERSION", variant.name),
        ("MODELDEPLOY_MODEL_SHA256", variant.model.sha256),
        ("MODELDEPLOY_HOST", "0.0.0.0"),
        ("MODELDEPLOY_PORT", str(naming.SERVER_PORT)),
    ]
    env.extend(render_server_settings_env(variant.server, md.example_instance).items())
    return [{"name": name, "value": value} for name, value in env]


def _env_value(value: float) -> str:
    # 2.0 -> "2", 0.5 -> "0.5": the same text whether the spec said 2 or 2.0, so no churn.
    return format(value, "g") if isinstance(value, float) else str(value)


def _router_objects(
    md: ModelDeployment, image: str, weights: Mapping[str, int], mirror: Shadow | None
) -> list[Manifest]:
    labels = naming.common_labels(md.name, naming.COMPONENT_ROUTER)
    name = naming.router_object_name(md.name)
    table_name = naming.route_table_name(md.name)
    route_table = _object(
        md,
        ROUTE_TABLE_API_VERSION,
        ROUTE_TABLE_KIND,
        table_name,
        labels,
        {"routes": render_routes_config(md, weights, mirror=mirror)},
    )
    # The router watches its RouteTable through the API (a mounted ConfigMap reaches the pod only
    # at the kubelet's next sync, about a minute) and acknowledges the version it serves in its
    # status: weight changes never restart a pod, so no config-hash annotation.
    settings = render_router_settings_env(md, f"{SHADOW_LOG_DIR}/{SHADOW_LOG_FILE}")
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    if md.routing.shadow is not None:
        volumes.append({"name": "shadow-log", "emptyDir": {"sizeLimit": SHADOW_LOG_VOLUME_LIMIT}})
        mounts.append({"name": "shadow-log", "mountPath": SHADOW_LOG_DIR})
    router = {
        "name": "router",
        "image": image,
        "command": ["modeldeploy-server"],
        "args": ["route"],
        "env": [
            {"name": ROUTE_TABLE_ENV, "value": f"{md.namespace}/{table_name}"},
            {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *({"name": name, "value": value} for name, value in settings.items()),
        ],
        "ports": [{"name": "http", "containerPort": naming.SERVER_PORT, "protocol": "TCP"}],
        **_probes(),
        **_pre_stop(),
        "resources": copy.deepcopy(ROUTER_RESOURCES),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    selector = naming.router_selector(md.name)
    deployment_spec = {
        "replicas": ROUTER_REPLICAS,
        "minReadySeconds": ROUTER_MIN_READY_SECONDS,
        "selector": {"matchLabels": selector},
        "template": {
            "metadata": {
                "labels": {**(md.pod.labels or {}), **labels},
                "annotations": _pod_annotations(md),
            },
            "spec": render_pod_spec(
                md.pod,
                init_containers=[],
                containers=[router],
                volumes=volumes,
                drain_seconds=ROUTER_DRAIN_SECONDS,
                service_account=ROUTER_IDENTITY,
            ),
        },
    }
    return [
        route_table,
        _object(md, "apps/v1", "Deployment", name, labels, deployment_spec),
        _service(md, name, selector, labels, naming.ROUTER_SERVICE_PORT),
        _pod_disruption_budget(md, name, selector, labels),
    ]


def render_router_identity(namespace: str) -> list[Manifest]:
    """The one identity of every router pod in `namespace`: ServiceAccount modeldeploy-router, bound
    to the ClusterRole of that name (manifests/rbac.yaml: read RouteTables, patch their status).

    Shared by the namespace's ModelDeployments and owned by none of them, so it outlives each one;
    one Role per ModelDeployment would cost the API server an escalation check at every creation.
    """
    labels = {
        naming.NAME: ROUTER_IDENTITY,
        naming.COMPONENT: naming.COMPONENT_ROUTER,
        naming.PART_OF_LABEL: naming.PART_OF,
        naming.MANAGED_BY: naming.FIELD_MANAGER,
    }
    metadata = {"name": ROUTER_IDENTITY, "namespace": namespace, "labels": labels}
    account: Manifest = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}
    binding: Manifest = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": copy.deepcopy(metadata),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": ROUTER_IDENTITY,
        },
        "subjects": [{"kind": "ServiceAccount", "name": ROUTER_IDENTITY, "namespace": namespace}],
    }
    return [account, binding]


def _http_route(md: ModelDeployment, weights: Mapping[str, int]) -> Manifest:
    gateway = md.routing.gateway
    assert gateway is not None  # parse_model_deployment guarantees it in gateway mode

    def path() -> Manifest:
        return {"type": "PathPrefix", "value": gateway.path_prefix}

    def backend(variant: Variant, weight: int) -> Manifest:
        return {
            "name": naming.variant_object_name(md.name, variant.name),
            "port": naming.SERVER_PORT,
            "weight": weight,
        }

    # A header match is more specific than a path-only match, so Gateway API precedence makes
    # these pinning rules win over the weighted split; they work for weight-0 variants too.
    pinned = [
        {
            "matches": [
                {
                    "path": path(),
                    "headers": [
                        {"type": "Exact", "name": md.routing.header_override, "value": v.name}
                    ],
                }
            ],
            "backendRefs": [backend(v, 1)],
        }
        for v in md.variants
    ]
    split: Manifest = {
        "matches": [{"path": path()}],
        "backendRefs": [backend(v, weights[v.name]) for v in md.variants],
    }
    shadow = md.routing.shadow
    if shadow is not None:
        mirrored = next(v for v in md.variants if v.name == shadow.variant)
        mirror = backend(mirrored, 0)
        del mirror["weight"]
        split["filters"] = [
            {
                "type": "RequestMirror",
                "requestMirror": {"backendRef": mirror, "percent": shadow.percent},
            }
        ]
    spec: Manifest = {"parentRefs": copy.deepcopy(list(gateway.parent_refs))}
    if gateway.hostnames:
        spec["hostnames"] = list(gateway.hostnames)
    spec["rules"] = [*pinned, split]
    labels = naming.common_labels(md.name, naming.COMPONENT_ROUTER)
    return _object(
        md,
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        naming.router_object_name(md.name),
        labels,
        spec,
    )


def _service(
    md: ModelDeployment,
    name: str,
    selector: dict[str, str],
    labels: dict[str, str],
    port: int,
    *,
    headless: bool = False,
) -> Manifest:
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "selector": selector,
        "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
    }
    if headless:
        # Clients connect to the pods' own port then, not the Service's: they are the same.
        spec["clusterIP"] = "None"
    return _object(md, "v1", "Service", name, labels, spec)


def _pod_disruption_budget(
    md: ModelDeployment, name: str, selector: dict[str, str], labels: dict[str, str]
) -> Manifest:
    spec = {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    return _object(md, "policy/v1", "PodDisruptionBudget", name, labels, spec)


def _horizontal_pod_autoscaler(md: ModelDeployment, variant: Variant) -> Manifest:
    scaling = variant.autoscaling
    assert scaling is not None
    name = naming.variant_object_name(md.name, variant.name)
    spec = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": scaling.target_cpu_utilization_percentage,
                    },
                },
            }
        ],
    }
    labels = naming.variant_labels(md.name, variant.name, variant.model.sha256)
    return _object(md, "autoscaling/v2", "HorizontalPodAutoscaler", name, labels, spec)


def render_pod_spec(
    pod: PodSettings,
    *,
    init_containers: list[Manifest],
    containers: list[Manifest],
    volumes: list[Manifest],
    drain_seconds: int,
    service_account: str | None = None,
) -> Manifest:
    """A pod spec with `spec.pod`'s settings and the restricted Pod Security Standard; only a pod
    given its own `service_account` (the router) gets an API token."""
    spec: Manifest = {}
    if service_account or pod.service_account_name:
        spec["serviceAccountName"] = service_account or pod.service_account_name
    # The router reads its routes ConfigMap through the API; the model servers never talk to it.
    spec["automountServiceAccountToken"] = service_account is not None
    # Service links inject `<SERVICE>_PORT` variables; a Service named `modeldeploy` would
    # otherwise collide with MODELDEPLOY_PORT.
    spec["enableServiceLinks"] = False
    spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if pod.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in pod.image_pull_secrets]
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        spec["tolerations"] = copy.deepcopy(list(pod.tolerations))
    if pod.affinity:
        spec["affinity"] = copy.deepcopy(pod.affinity)
    if init_containers:
        spec["initContainers"] = init_containers
    spec["containers"] = containers
    spec["volumes"] = volumes
    # preStop, then SIGTERM: the process keeps its port open for SHUTDOWN_DELAY_S (readiness
    # failing), then drains its in-flight requests.
    spec["terminationGracePeriodSeconds"] = (
        PRESTOP_SLEEP_SECONDS + SHUTDOWN_DELAY_S + drain_seconds + SHUTDOWN_MARGIN_SECONDS
    )
    return spec


def _pod_annotations(md: ModelDeployment) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(naming.SERVER_PORT),
        "prometheus.io/path": "/metrics",
        **(md.pod.annotations or {}),
    }


def _pre_stop() -> Manifest:
    return {"lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}}}


def _probes() -> Manifest:
    def probe(path: str, period: int, failures: int) -> Manifest:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

    return {
        # Loading a large model can take a while: the startup probe holds liveness off until then.
        "startupProbe": probe("/v2/health/live", 2, 60),
        "readinessProbe": probe("/v2/health/ready", 5, 3),
        "livenessProbe": probe("/v2/health/live", 10, 3),
    }


def container_security_context() -> Manifest:
    """The restricted Pod Security Standard, per container."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _object(
    md: ModelDeployment,
    api_version: str,
    kind: str,
    name: str,
    labels: dict[str, str],
    spec: Manifest | None,
) -> Manifest:
    metadata: Manifest = {"name": name, "namespace": md.namespace, "labels": labels}
    if md.uid is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": MODEL_DEPLOYMENT_API_VERSION,
                "kind": KIND,
                "name": md.name,
                "uid": md.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    obj: Manifest = {"apiVersion": api_version, "kind": kind, "metadata": metadata}
    if spec is not None:
        obj["spec"] = spec
    return obj


def router_timeout_seconds(md: ModelDeployment) -> int | None:
    """The router's wait for a variant's answer: routing.timeoutSeconds, else long enough for the
    slowest variant's own request timeout; None leaves the router's default."""
    if md.routing.timeout_seconds is not None:
        return md.routing.timeout_seconds
    longest = max((v.server.request_timeout_seconds or 0 for v in md.variants), default=0)
    needed = math.ceil(longest) + ROUTER_TIMEOUT_MARGIN_SECONDS
    return needed if longest and needed > ROUTER_DEFAULT_TIMEOUT_S else None


def render_router_settings_env(md: ModelDeployment, shadow_log: str) -> dict[str, str]:
    """The `modeldeploy-server route` env for the spec's routing settings (also local mode):
    the timeout, and with routing.shadow the disagreement log at `shadow_log`."""
    env = {}
    timeout = router_timeout_seconds(md)
    if timeout is not None:
        env[ROUTER_TIMEOUT_ENV] = str(timeout)
    if md.routing.shadow is not None:
        env[ROUTER_SHADOW_LOG_ENV] = shadow_log
        env[ROUTER_SHADOW_LOG_MAX_BYTES_ENV] = str(SHADOW_LOG_MAX_BYTES)
    return env


def render_server_settings_env(
    settings: ServerSettings, example_instance: Mapping[str, Any] | None
) -> dict[str, str]:
    """The `modeldeploy-server serve` env for a variant's `server:` settings and the
    ModelDeployment's example instance, its warm-up request (also local mode)."""
    env = {
        var: _env_value(getattr(settings, field))
        for field, var in SERVER_ENV
        if getattr(settings, field) is not None
    }
    if example_instance is not None:
        env[WARMUP_EXAMPLE_ENV] = json.dumps(example_instance, separators=(",", ":"))
    return env
