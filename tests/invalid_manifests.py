"""ModelDeployments the API must refuse, each with the field the refusal must name.

Shared by the admission tests (the real apiserver), the offline validator's tests and the
`modeldeploy validate` tests, so all three are held to the same data and the same field paths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Manifest = dict[str, Any]

SHA_V1 = "3f4a8c2d9e1b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"
SHA_V2 = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"


def minimal_manifest(name: str = "iris") -> Manifest:
    """The smallest valid ModelDeployment: one variant taking all the traffic."""
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "variants": [
                {
                    "name": "v1",
                    "model": {"uri": "https://models.example.com/iris/v1.onnx", "sha256": SHA_V1},
                    "weight": 100,
                }
            ]
        },
    }


def full_manifest(name: str = "iris") -> Manifest:
    """A valid ModelDeployment that sets every field a user can set."""
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "labels": {"team": "fraud"}},
        "spec": {
            "variants": [
                {
                    "name": "v1",
                    "model": {"uri": "pvc://models/iris/v1.onnx", "sha256": SHA_V1},
                    "weight": 90,
                    "replicas": 2,
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "256Mi"},
                        "limits": {"cpu": 2, "memory": "1Gi"},
                    },
                    "server": {
                        "maxBatchSize": 32,
                        "maxBatchDelayMs": 2,
                        "intraOpThreads": 1,
                        "maxRequestBytes": 6291456,
                        "maxRows": 10000,
                        "requestTimeoutSeconds": 30,
                    },
                },
                {
                    "name": "v2",
                    "model": {"uri": "file:///models/iris-v2.onnx", "sha256": SHA_V2},
                    "weight": 10,
                    "autoscaling": {
                        "minReplicas": 1,
                        "maxReplicas": 5,
                        "targetCPUUtilizationPercentage": 70,
                    },
                    "resources": {"requests": {"cpu": "250m"}},
                },
                {
                    "name": "v3-dark",
                    "model": {"uri": "http://models.internal:8000/iris/v3.onnx", "sha256": SHA_V2},
                    "weight": 0,
                    "replicas": 0,
                },
            ],
            "routing": {
                "mode": "gateway",
                "headerOverride": "x-iris-variant",
                "gateway": {
                    "parentRefs": [{"name": "public", "namespace": "infra", "sectionName": "http"}],
                    "hostnames": ["models.example.com", "*.models.example.com"],
                    "pathPrefix": "/iris",
                },
            },
            "pod": {
                "image": "registry.example.com/modeldeploy-server:1.2.3",
                "imagePullSecrets": [{"name": "registry-credentials"}],
                "serviceAccountName": "model-reader",
                "nodeSelector": {"kubernetes.io/arch": "amd64"},
                "tolerations": [
                    {
                        "key": "dedicated",
                        "operator": "Equal",
                        "value": "ml",
                        "effect": "NoSchedule",
                    },
                    {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                ],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": "pool", "operator": "In", "values": ["ml"]}
                                    ]
                                }
                            ]
                        }
                    }
                },
                "labels": {"team": "fraud", "cost-center": "c123"},
                "annotations": {"example.com/owner": "fraud-team@example.com"},
            },
        },
    }


def two_variant_manifest(name: str = "iris") -> Manifest:
    """A valid 90/10 canary; the base of most invalid cases below."""
    manifest = minimal_manifest(name)
    v1 = manifest["spec"]["variants"][0]
    v1["weight"] = 90
    v2 = copy.deepcopy(v1)
    v2.update(name="v2", weight=10)
    v2["model"].update(uri="https://models.example.com/iris/v2.onnx", sha256=SHA_V2)
    manifest["spec"]["variants"].append(v2)
    return manifest


def sticky_manifest(name: str = "iris") -> Manifest:
    """The 90/10 canary with sticky cohorts by a user header."""
    manifest = two_variant_manifest(name)
    manifest["spec"]["routing"] = {"stickyHeader": "x-user-id"}
    return manifest


def shadow_manifest(name: str = "iris") -> Manifest:
    """v1 live, v2 dark and shadowed on 10% of the requests; the router waits 20 s for either."""
    manifest = two_variant_manifest(name)
    manifest["spec"]["variants"][0]["weight"] = 100
    manifest["spec"]["variants"][1]["weight"] = 0
    manifest["spec"]["routing"] = {
        "shadow": {"variant": "v2", "percent": 10, "tolerance": 0.001},
        "timeoutSeconds": 20,
    }
    return manifest


def rollout_manifest(name: str = "iris") -> Manifest:
    """The 90/10 canary reached in gated, analysed steps: every gate and rollout field set."""
    manifest = two_variant_manifest(name)
    manifest["spec"]["variants"][1]["gate"] = {
        "dataset": {"uri": "https://data.example.com/iris/golden.csv", "sha256": SHA_V1},
        "against": "v1",
        "outputs": ["label"],
        "absoluteTolerance": 0.001,
        "relativeTolerance": 0.01,
        "minAgreement": 0.98,
    }
    manifest["spec"]["rollout"] = {
        "steps": [{"percent": 10, "holdSeconds": 300}, {"percent": 50, "holdSeconds": 600}],
        "analysis": {
            "errorRate": {"max": 0.01, "maxRatioToStable": 2},
            "p99LatencyMs": {"maxRatioToStable": 1.5},
            "shadowDisagreement": {"max": 0.05},
            "prometheus": {"url": "http://prometheus.monitoring.svc:9090"},
        },
        "minSamples": 200,
        "failureLimit": 1,
        "lowTraffic": "rollback",
        "intervalSeconds": 15,
        "deadlineSeconds": 7200,
        "probes": {"requestsPerSecond": 3},
        "shadow": {"percent": 50, "holdSeconds": 120, "tolerance": 0.001},
    }
    return manifest


VALID_MANIFESTS: dict[str, Callable[[str], Manifest]] = {
    "minimal": minimal_manifest,
    "two-variants": two_variant_manifest,
    "sticky": sticky_manifest,
    "shadow": shadow_manifest,
    "full": full_manifest,
    "rollout": rollout_manifest,
}


@dataclass(frozen=True)
class InvalidManifest:
    """A manifest the API refuses, and the field path the refusal names."""

    id: str
    manifest: Manifest
    field: str


def _spec(m: Manifest) -> Any:
    return m["spec"]


def _variant(m: Manifest, index: int) -> Any:
    return m["spec"]["variants"][index]


def _long_names(m: Manifest) -> None:
    # Each name is valid alone; "<40 chars>-<30 chars>" is too long for a Service name.
    m["metadata"]["name"] = "a" * 40
    _variant(m, 1)["name"] = "b" * 30


def _seventeen_variants(m: Manifest) -> None:
    template = _variant(m, 1)
    _spec(m)["variants"] = [{**template, "name": f"v{i}", "weight": 0} for i in range(17)]
    _variant(m, 0)["weight"] = 100


def _gateway_routing(**gateway: Any) -> dict[str, Any]:
    return {"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw"}], **gateway}}


def _case(id: str, field: str, change: Callable[[Manifest], object]) -> InvalidManifest:
    manifest = two_variant_manifest()
    change(manifest)
    return InvalidManifest(id, manifest, field)


def _rollout_case(id: str, field: str, change: Callable[[Manifest], object]) -> InvalidManifest:
    manifest = rollout_manifest()
    change(manifest)
    return InvalidManifest(id, manifest, field)


def _gate(m: Manifest) -> Any:
    return m["spec"]["variants"][1]["gate"]


def _rollout(m: Manifest) -> Any:
    return m["spec"]["rollout"]


INVALID_MANIFESTS: list[InvalidManifest] = [
    _case("weights-sum-not-100", "spec.variants", lambda m: _variant(m, 1).update(weight=20)),
    _case(
        "weight-above-100", "spec.variants[0].weight", lambda m: _variant(m, 0).update(weight=101)
    ),
    _case(
        "weight-negative", "spec.variants[1].weight", lambda m: _variant(m, 1).update(weight=-10)
    ),
    _case(
        "weight-not-integer",
        "spec.variants[0].weight",
        lambda m: _variant(m, 0).update(weight="90%"),
    ),
    _case("weight-missing", "spec.variants[1].weight", lambda m: _variant(m, 1).pop("weight")),
    _case("no-variants", "spec.variants", lambda m: _spec(m).update(variants=[])),
    _case("variants-missing", "spec.variants", lambda m: _spec(m).pop("variants")),
    _case("duplicate-variant-names", "spec.variants", lambda m: _variant(m, 1).update(name="v1")),
    _case("too-many-variants", "spec.variants", _seventeen_variants),
    _case("variant-name-empty", "spec.variants[1].name", lambda m: _variant(m, 1).update(name="")),
    _case(
        "variant-name-not-dns-label",
        "spec.variants[1].name",
        lambda m: _variant(m, 1).update(name="V2_canary"),
    ),
    _case(
        "variant-name-too-long",
        "spec.variants[1].name",
        lambda m: _variant(m, 1).update(name="v" * 33),
    ),
    _case("name-too-long-for-variant-services", "metadata.name", _long_names),
    _case("name-not-dns-1035", "metadata.name", lambda m: m["metadata"].update(name="9iris")),
    _case("name-uppercase", "metadata.name", lambda m: m["metadata"].update(name="Iris")),
    _case(
        "model-uri-unsupported-scheme",
        "spec.variants[0].model.uri",
        lambda m: _variant(m, 0)["model"].update(uri="s3://bucket/iris.onnx"),
    ),
    _case(
        "model-uri-relative-file",
        "spec.variants[0].model.uri",
        lambda m: _variant(m, 0)["model"].update(uri="file://iris.onnx"),
    ),
    _case(
        "model-uri-path-traversal",
        "spec.variants[1].model.uri",
        lambda m: _variant(m, 1)["model"].update(uri="pvc://models/../../etc/passwd"),
    ),
    _case(
        "model-sha256-not-hex",
        "spec.variants[0].model.sha256",
        lambda m: _variant(m, 0)["model"].update(sha256=SHA_V1.upper()),
    ),
    _case(
        "model-sha256-missing",
        "spec.variants[1].model.sha256",
        lambda m: _variant(m, 1)["model"].pop("sha256"),
    ),
    _case(
        "replicas-negative",
        "spec.variants[0].replicas",
        lambda m: _variant(m, 0).update(replicas=-1),
    ),
    _case(
        "replicas-with-autoscaling",
        "spec.variants[0].replicas",
        lambda m: _variant(m, 0).update(replicas=3, autoscaling={"maxReplicas": 5}),
    ),
    _case(
        "autoscaling-min-above-max",
        "spec.variants[1].autoscaling",
        lambda m: _variant(m, 1).update(autoscaling={"minReplicas": 4, "maxReplicas": 2}),
    ),
    _case(
        "autoscaling-max-missing",
        "spec.variants[1].autoscaling.maxReplicas",
        lambda m: _variant(m, 1).update(autoscaling={"minReplicas": 2}),
    ),
    _case(
        "autoscaling-target-cpu-zero",
        "spec.variants[1].autoscaling.targetCPUUtilizationPercentage",
        lambda m: _variant(m, 1).update(
            autoscaling={"maxReplicas": 3, "targetCPUUtilizationPercentage": 0}
        ),
    ),
    _case(
        "resources-bad-quantity",
        "spec.variants[0].resources.limits.memory",
        lambda m: _variant(m, 0).update(resources={"limits": {"memory": "lots"}}),
    ),
    _case(
        "resources-request-above-limit",
        "spec.variants[0].resources.requests",
        lambda m: _variant(m, 0).update(
            resources={"requests": {"cpu": 2, "memory": "1Gi"}, "limits": {"cpu": "1500m"}}
        ),
    ),
    _case(
        "resources-quantity-float",
        "spec.variants[0].resources.limits.cpu",
        lambda m: _variant(m, 0).update(resources={"limits": {"cpu": 1.5}}),
    ),
    _case(
        "server-batch-size-zero",
        "spec.variants[0].server.maxBatchSize",
        lambda m: _variant(m, 0).update(server={"maxBatchSize": 0}),
    ),
    _case(
        "server-request-bytes-too-large",
        "spec.variants[0].server.maxRequestBytes",
        lambda m: _variant(m, 0).update(server={"maxRequestBytes": 2**31}),
    ),
    _case(
        "routing-mode-unknown",
        "spec.routing.mode",
        lambda m: _spec(m).update(routing={"mode": "istio"}),
    ),
    _case(
        "gateway-mode-without-gateway",
        "spec.routing.gateway",
        lambda m: _spec(m).update(routing={"mode": "gateway"}),
    ),
    _case(
        "gateway-settings-in-router-mode",
        "spec.routing.gateway",
        lambda m: _spec(m).update(routing={"gateway": {"parentRefs": [{"name": "gw"}]}}),
    ),
    _case(
        "gateway-without-parent-refs",
        "spec.routing.gateway.parentRefs",
        lambda m: _spec(m).update(routing={"mode": "gateway", "gateway": {"parentRefs": []}}),
    ),
    _case(
        "gateway-path-prefix-relative",
        "spec.routing.gateway.pathPrefix",
        lambda m: _spec(m).update(routing=_gateway_routing(pathPrefix="iris")),
    ),
    _case(
        "gateway-path-prefix-dot-segment",
        "spec.routing.gateway.pathPrefix",
        lambda m: _spec(m).update(routing=_gateway_routing(pathPrefix="/a/../b")),
    ),
    _case(
        "header-override-uppercase",
        "spec.routing.headerOverride",
        lambda m: _spec(m).update(routing={"headerOverride": "X-Model-Variant"}),
    ),
    _case(
        "header-override-standard-header",
        "spec.routing.headerOverride",
        lambda m: _spec(m).update(routing={"headerOverride": "host"}),
    ),
    _case(
        "shadow-variant-with-weight",
        "spec.routing.shadow.variant",
        lambda m: _spec(m).update(routing={"shadow": {"variant": "v2", "percent": 10}}),
    ),
    _case(
        "shadow-variant-unknown",
        "spec.routing.shadow.variant",
        lambda m: _spec(m).update(routing={"shadow": {"variant": "v9", "percent": 10}}),
    ),
    _case(
        "shadow-percent-above-100",
        "spec.routing.shadow.percent",
        lambda m: _spec(m).update(routing={"shadow": {"variant": "v2", "percent": 101}}),
    ),
    _case(
        "shadow-in-mode-none",
        "spec.routing.shadow",
        lambda m: _spec(m).update(
            routing={"mode": "none", "shadow": {"variant": "v2", "percent": 10}}
        ),
    ),
    _case(
        "shadow-tolerance-in-gateway-mode",
        "spec.routing.shadow.tolerance",
        lambda m: _spec(m).update(
            routing={
                **_gateway_routing(),
                "shadow": {"variant": "v2", "percent": 1, "tolerance": 0},
            }
        ),
    ),
    _case(
        "router-timeout-in-gateway-mode",
        "spec.routing.timeoutSeconds",
        lambda m: _spec(m).update(routing={**_gateway_routing(), "timeoutSeconds": 30}),
    ),
    _case(
        "sticky-header-in-gateway-mode",
        "spec.routing.stickyHeader",
        lambda m: _spec(m).update(routing={**_gateway_routing(), "stickyHeader": "x-user"}),
    ),
    _case(
        "sticky-header-is-the-override-header",
        "spec.routing.stickyHeader",
        lambda m: _spec(m).update(routing={"headerOverride": "x-user", "stickyHeader": "x-user"}),
    ),
    _case(
        "sticky-header-standard-header",
        "spec.routing.stickyHeader",
        lambda m: _spec(m).update(routing={"stickyHeader": "x-forwarded-for"}),
    ),
    _case(
        "pod-label-reserved-prefix",
        "spec.pod.labels",
        lambda m: _spec(m).update(pod={"labels": {"app.kubernetes.io/name": "mine"}}),
    ),
    _case(
        "pod-annotation-reserved-prefix",
        "spec.pod.annotations",
        lambda m: _spec(m).update(pod={"annotations": {"modeldeploy.dev/model-sha256": "x"}}),
    ),
    _case(
        "pod-too-many-labels",
        "spec.pod.labels",
        lambda m: _spec(m).update(pod={"labels": {f"l{i}": "x" for i in range(33)}}),
    ),
    _case(
        "gateway-hostname-with-port",
        "spec.routing.gateway.hostnames[1]",
        lambda m: _spec(m).update(
            routing=_gateway_routing(hostnames=["models.example.com", "models.example.com:8080"])
        ),
    ),
    _case(
        "pod-label-value-too-long",
        "spec.pod.labels[team]",
        lambda m: _spec(m).update(pod={"labels": {"team": "x" * 64}}),
    ),
    _case(
        "pod-annotation-value-too-long",
        "spec.pod.annotations[note]",
        lambda m: _spec(m).update(pod={"annotations": {"note": "x" * 65537}}),
    ),
    _case(
        "node-selector-value-too-long",
        "spec.pod.nodeSelector[pool]",
        lambda m: _spec(m).update(pod={"nodeSelector": {"pool": "x" * 64}}),
    ),
    *[
        _case(
            f"gateway-parent-ref-{name.lower()}-too-long",
            f"spec.routing.gateway.parentRefs[0].{name}",
            lambda m, name=name, size=size: _spec(m).update(
                routing={"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw", name: size}]}}
            ),
        )
        for name, size in [
            ("group", "g" * 254),
            ("kind", "K" * 64),
            ("name", "n" * 254),
            ("namespace", "n" * 64),
            ("sectionName", "s" * 254),
        ]
    ],
    _case(
        "gateway-too-many-parent-refs",
        "spec.routing.gateway.parentRefs",
        lambda m: _spec(m).update(
            routing={
                "mode": "gateway",
                "gateway": {"parentRefs": [{"name": f"gw{i}"} for i in range(17)]},
            }
        ),
    ),
    _case(
        "gateway-too-many-hostnames",
        "spec.routing.gateway.hostnames",
        lambda m: _spec(m).update(
            routing=_gateway_routing(hostnames=[f"h{i}.example.com" for i in range(17)])
        ),
    ),
    _case(
        "gateway-hostname-too-long",
        "spec.routing.gateway.hostnames[0]",
        lambda m: _spec(m).update(routing=_gateway_routing(hostnames=["h" * 254])),
    ),
    _case(
        "pod-image-too-long",
        "spec.pod.image",
        lambda m: _spec(m).update(pod={"image": "i" * 513}),
    ),
    _case(
        "pod-too-many-pull-secrets",
        "spec.pod.imagePullSecrets",
        lambda m: _spec(m).update(pod={"imagePullSecrets": [{"name": f"s{i}"} for i in range(9)]}),
    ),
    _case(
        "pod-pull-secret-name-too-long",
        "spec.pod.imagePullSecrets[0].name",
        lambda m: _spec(m).update(pod={"imagePullSecrets": [{"name": "s" * 254}]}),
    ),
    _case(
        "pod-service-account-name-too-long",
        "spec.pod.serviceAccountName",
        lambda m: _spec(m).update(pod={"serviceAccountName": "s" * 254}),
    ),
    _case(
        "toleration-key-too-long",
        "spec.pod.tolerations[0].key",
        lambda m: _spec(m).update(pod={"tolerations": [{"key": "k" * 317, "operator": "Exists"}]}),
    ),
    _case(
        "pod-image-with-space",
        "spec.pod.image",
        lambda m: _spec(m).update(pod={"image": "modeldeploy server:1"}),
    ),
    _case(
        "pod-duplicate-pull-secrets",
        "spec.pod.imagePullSecrets[1]",
        lambda m: _spec(m).update(pod={"imagePullSecrets": [{"name": "reg"}, {"name": "reg"}]}),
    ),
    _case(
        "toleration-exists-with-value",
        "spec.pod.tolerations[0].value",
        lambda m: _spec(m).update(
            pod={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}
        ),
    ),
    _case(
        "toleration-seconds-without-no-execute",
        "spec.pod.tolerations[0].tolerationSeconds",
        lambda m: _spec(m).update(
            pod={"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30}]}
        ),
    ),
]


INVALID_MANIFESTS += [
    _rollout_case(
        "rollout-prometheus-url-not-http",
        "spec.rollout.analysis.prometheus.url",
        lambda m: _rollout(m)["analysis"]["prometheus"].update(url="prometheus:9090"),
    ),
    _rollout_case(
        "rollout-prometheus-url-missing",
        "spec.rollout.analysis.prometheus.url",
        lambda m: _rollout(m)["analysis"]["prometheus"].pop("url"),
    ),
    _rollout_case(
        "rollout-shadow-without-a-disagreement-bound",
        "spec.rollout.shadow",
        lambda m: _rollout(m)["analysis"].pop("shadowDisagreement"),
    ),
    _rollout_case(
        "rollout-shadow-percent-zero",
        "spec.rollout.shadow.percent",
        lambda m: _rollout(m)["shadow"].update(percent=0),
    ),
    _rollout_case(
        "rollout-probes-rate-zero",
        "spec.rollout.probes.requestsPerSecond",
        lambda m: _rollout(m)["probes"].update(requestsPerSecond=0),
    ),
    _rollout_case(
        "rollout-probes-without-a-gate",
        "spec.rollout.probes",
        lambda m: m["spec"]["variants"][1].pop("gate"),
    ),
    _rollout_case("gate-against-itself", "spec.variants", lambda m: _gate(m).update(against="v2")),
    _rollout_case(
        "gate-against-unknown-variant", "spec.variants", lambda m: _gate(m).update(against="v9")
    ),
    _rollout_case(
        "gate-dataset-unsupported-scheme",
        "spec.variants[1].gate.dataset.uri",
        lambda m: _gate(m)["dataset"].update(uri="s3://bucket/golden.csv"),
    ),
    _rollout_case(
        "gate-dataset-sha256-missing",
        "spec.variants[1].gate.dataset.sha256",
        lambda m: _gate(m)["dataset"].pop("sha256"),
    ),
    _rollout_case(
        "gate-dataset-format-unknown",
        "spec.variants[1].gate.dataset.format",
        lambda m: _gate(m)["dataset"].update(format="parquet"),
    ),
    _rollout_case(
        "gate-min-agreement-above-1",
        "spec.variants[1].gate.minAgreement",
        lambda m: _gate(m).update(minAgreement=1.5),
    ),
    _rollout_case(
        "gate-tolerance-negative",
        "spec.variants[1].gate.absoluteTolerance",
        lambda m: _gate(m).update(absoluteTolerance=-0.1),
    ),
    _rollout_case(
        "rollout-steps-not-increasing",
        "spec.rollout.steps",
        lambda m: _rollout(m)["steps"].reverse(),
    ),
    _rollout_case(
        "rollout-steps-repeated",
        "spec.rollout.steps",
        lambda m: _rollout(m)["steps"][1].update(percent=10),
    ),
    _rollout_case(
        "rollout-step-percent-100",
        "spec.rollout.steps[1].percent",
        lambda m: _rollout(m)["steps"][1].update(percent=100),
    ),
    _rollout_case(
        "rollout-step-hold-missing",
        "spec.rollout.steps[0].holdSeconds",
        lambda m: _rollout(m)["steps"][0].pop("holdSeconds"),
    ),
    *[
        _rollout_case(
            f"rollout-bound-{metric}-empty",
            f"spec.rollout.analysis.{metric}",
            lambda m, metric=metric: _rollout(m)["analysis"].update({metric: {}}),
        )
        for metric in ("errorRate", "p99LatencyMs", "shadowDisagreement")
    ],
    _rollout_case(
        "rollout-error-rate-above-1",
        "spec.rollout.analysis.errorRate.max",
        lambda m: _rollout(m)["analysis"]["errorRate"].update(max=5),
    ),
    _rollout_case(
        "rollout-low-traffic-unknown",
        "spec.rollout.lowTraffic",
        lambda m: _rollout(m).update(lowTraffic="guess"),
    ),
    _rollout_case(
        "rollout-min-samples-zero",
        "spec.rollout.minSamples",
        lambda m: _rollout(m).update(minSamples=0),
    ),
]


FieldPath = tuple[str | int, ...]


def _nodes(value: Any, path: FieldPath) -> Iterator[tuple[FieldPath, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _nodes(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _nodes(child, (*path, index))


def _wrong_values(value: Any) -> list[Any]:
    """Values of the wrong type, out of bounds or malformed, for a field now holding `value`."""
    if isinstance(value, dict):
        return ["x", [], {}, None]
    if isinstance(value, list):
        return ["x", {}, [], None, value * 20]
    if isinstance(value, bool):
        return ["yes"]
    if isinstance(value, int):
        return [-1, 10**6, "7", 2.5]
    return [7, "", "Has Space", "x" * 300, "a/../b"]


_REMOVED = object()


@dataclass(frozen=True)
class FieldChange:
    """Put a wrong value at one path of a manifest, or remove what is there."""

    path: FieldPath
    value: Any

    @property
    def label(self) -> str:
        where = ".".join(map(str, self.path))
        return f"{where} removed" if self.value is _REMOVED else f"{where}={self.value!r:.24}"

    def apply(self, manifest: Manifest) -> None:
        """Change `manifest` in place; nothing happens where an earlier change removed the path."""
        parent: Any = manifest
        for step in self.path[:-1]:
            if not _has(parent, step):
                return
            parent = parent[step]
        last = self.path[-1]
        if not _has(parent, last):
            return
        if self.value is _REMOVED:
            del parent[last]
        else:
            parent[last] = copy.deepcopy(self.value)


def _has(container: Any, step: str | int) -> bool:
    if isinstance(step, int):
        return isinstance(container, list) and step < len(container)
    return isinstance(container, dict) and step in container


def field_changes(manifest: Manifest) -> list[FieldChange]:
    """Every single-field change of the spec: each wrong value for each field, and its removal."""
    return [
        FieldChange(path, wrong)
        for path, value in list(_nodes(manifest["spec"], ("spec",)))[1:]
        for wrong in [*_wrong_values(value), _REMOVED]
    ]


def field_mutations(manifest: Manifest) -> Iterator[tuple[str, Manifest]]:
    """`manifest` changed by each of its field changes in turn, one at a time."""
    for change in field_changes(manifest):
        changed = copy.deepcopy(manifest)
        change.apply(changed)
        yield change.label, changed


# (request, limit, whether request <= limit): Kubernetes quantity arithmetic across notations.
QUANTITY_ORDER: list[tuple[str | int, str | int, bool]] = [
    ("1Gi", "1073741824", True),
    ("1025Mi", "1Gi", False),
    ("1e3", "1k", True),
    ("500m", "0.5", True),
    ("501m", "0.5", False),
    (2, "2000m", True),
    ("1.5", 1, False),
    ("1Ki", "1k", False),
    ("1E", "1000P", True),
    ("100n", "1u", True),
    ("+1", "1", True),
]


def with_cpu(request: str | int, limit: str | int) -> Manifest:
    """A valid manifest but for the first variant's CPU request and limit."""
    manifest = two_variant_manifest()
    _variant(manifest, 0)["resources"] = {"requests": {"cpu": request}, "limits": {"cpu": limit}}
    return manifest


# What kubectl's YAML (go-yaml v2 through sigs.k8s.io/yaml, then JSON) makes of unquoted scalars
# where PyYAML's safe_load differs: (field line, kubectl's verdict). Checked against the real
# apiserver with a real kubectl in tests/operator/test_crd_admission.py.
KUBECTL_SCALARS = {
    # An all-digit sha256 is a float64 for go-yaml (too big for an int64): a JSON number.
    "all-digit-sha256": (
        "sha256: " + "1" * 64,
        'spec.variants[0].model.sha256: Invalid value: "number":'
        ' spec.variants[0].model.sha256 in body must be of type string: "number"',
    ),
    # y and n are booleans in YAML 1.1 as go-yaml reads it; PyYAML keeps them strings.
    "label-y-is-a-boolean": (
        "labels: {canary: y}",
        'spec.pod.labels.canary: Invalid value: "boolean":'
        ' spec.pod.labels.canary in body must be of type string: "boolean"',
    ),
    # 1e2 is a float for go-yaml, written as 100 in JSON: an integer for the apiserver.
    "weight-1e2": ("weight: 1e2", None),
    "weight-0o144-octal": ("weight: 0o144", None),
    # A date stays a string in go-yaml; PyYAML makes it a datetime.date.
    "annotation-date": ("annotations: {released: 2026-10-02}", None),
    # Sexagesimal is not YAML for go-yaml: a string; PyYAML makes it the int 100.
    "weight-sexagesimal": (
        "weight: 1:40",
        'spec.variants[0].weight: Invalid value: "string":'
        ' spec.variants[0].weight in body must be of type integer: "string"',
    ),
}
KUBECTL_BASE = """apiVersion: modeldeploy.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: iris
spec:
  variants:
    - name: v1
      model:
        uri: https://models.example.com/iris/v1.onnx
        sha256: 3f4a8c2d9e1b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c
      weight: 100
  pod:
    labels: {team: ml}
    annotations: {owner: ml}
"""


def kubectl_scalar_file(line: str) -> str:
    """KUBECTL_BASE with `line` replacing the line that sets the same field."""
    key = line.split(":", 1)[0]
    lines = KUBECTL_BASE.splitlines()
    (index,) = [i for i, old in enumerate(lines) if old.strip().startswith(f"{key}:")]
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
    lines[index] = indent + line
    return "\n".join(lines) + "\n"
