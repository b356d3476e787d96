"""Names and labels of the objects a ModelDeployment owns: one place, so render, prune and the
child watch always agree on them."""

from __future__ import annotations

import hashlib

FIELD_MANAGER = "modeldeploy-operator"
# Earlier versions let kopf keep this finalizer on ModelDeployments and BatchPredictions; one left
# there would block their deletion, so the operator removes it wherever it sees it.
LEGACY_FINALIZER = "modeldeploy.dev/operator"
PART_OF = "modeldeploy"

# Labels on every object the operator owns; prune and the child watch select on the first two.
MANAGED_BY = "app.kubernetes.io/managed-by"
MODEL_DEPLOYMENT = "modeldeploy.dev/model-deployment"
INSTANCE = "app.kubernetes.io/instance"
NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
PART_OF_LABEL = "app.kubernetes.io/part-of"
VARIANT = "modeldeploy.dev/variant"
MODEL_DIGEST = "modeldeploy.dev/model-digest"
# On every child: a hash of the manifest last applied (skip applies that would change nothing).
APPLIED_HASH = "modeldeploy.dev/applied-hash"

COMPONENT_VARIANT = "variant"
COMPONENT_ROUTER = "router"
COMPONENT_GATE = "gate"  # a variant's gate Job and its pods
COMPONENT_PROBE = "probe"  # a rollout window's probe Job and its pod

# Users may add pod labels (spec.pod.labels) but not ones the selectors and prune rely on.
RESERVED_LABELS = frozenset(
    {MANAGED_BY, MODEL_DEPLOYMENT, INSTANCE, NAME, COMPONENT, PART_OF_LABEL, VARIANT, MODEL_DIGEST}
)

MAX_NAME_LENGTH = 63  # DNS-1035 label, the limit for Service names
SERVER_PORT = 8080
ROUTER_SERVICE_PORT = 80
# The label the EndpointSlice controller puts on a Service's slices.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def variant_object_name(md_name: str, variant: str) -> str:
    """Deployment, Service, PodDisruptionBudget and HPA of one variant."""
    return f"{md_name}-{variant}"


def router_object_name(md_name: str) -> str:
    """The router's Deployment and Service, and the HTTPRoute: the ModelDeployment's own name."""
    return md_name


def route_table_name(md_name: str) -> str:
    """The router's RouteTable."""
    return f"{md_name}-routes"


def variant_service_url(md_name: str, variant: str, namespace: str) -> str:
    return f"http://{variant_object_name(md_name, variant)}.{namespace}.svc:{SERVER_PORT}"


def router_url(md_name: str, namespace: str) -> str:
    return f"http://{router_object_name(md_name)}.{namespace}.svc"


def probe_token(uid: str) -> str:
    """The token a ModelDeployment's probe traffic carries, and its routers expect: derived from
    its uid, which only readers of the API (never the model's HTTP clients) can see."""
    return hashlib.sha256(f"modeldeploy-probe/{uid}".encode()).hexdigest()[:32]


def owned_selector(md_name: str) -> str:
    """Label selector for everything this operator owns for one ModelDeployment."""
    return f"{MANAGED_BY}={FIELD_MANAGER},{MODEL_DEPLOYMENT}={md_name}"


def variant_pods_selector(md_name: str) -> str:
    """Label selector for the pods of every variant of one ModelDeployment."""
    return f"{owned_selector(md_name)},{COMPONENT}={COMPONENT_VARIANT}"


def common_labels(md_name: str, component: str) -> dict[str, str]:
    return {
        NAME: "modeldeploy-server",
        INSTANCE: md_name,
        COMPONENT: component,
        PART_OF_LABEL: PART_OF,
        MANAGED_BY: FIELD_MANAGER,
        MODEL_DEPLOYMENT: md_name,
    }


def variant_selector(md_name: str, variant: str) -> dict[str, str]:
    """Immutable Deployment selector of a variant (never includes the model digest)."""
    return {MODEL_DEPLOYMENT: md_name, COMPONENT: COMPONENT_VARIANT, VARIANT: variant}


def router_selector(md_name: str) -> dict[str, str]:
    return {MODEL_DEPLOYMENT: md_name, COMPONENT: COMPONENT_ROUTER}


def variant_labels(md_name: str, variant: str, sha256: str) -> dict[str, str]:
    return {
        **common_labels(md_name, COMPONENT_VARIANT),
        VARIANT: variant,
        MODEL_DIGEST: model_digest_label(sha256),
    }


def model_digest_label(sha256: str) -> str:
    """A label value holds at most 63 characters; 63 hex digits still identify the model."""
    return sha256[:63]
