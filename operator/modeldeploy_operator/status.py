"""The ModelDeployment's status, computed whole from the spec and the observed child Deployments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modeldeploy_operator import naming
from modeldeploy_operator.spec import ModelDeployment, Variant

Status = dict[str, Any]
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def ready_variants(md: ModelDeployment, deployments: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Variants whose Deployment has at least one ready replica: the ones that get traffic."""
    return {
        v.name
        for v in md.variants
        if _int(deployments.get(naming.variant_object_name(md.name, v.name)), "readyReplicas") > 0
    }


def compute_status(
    md: ModelDeployment,
    deployments: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, int],
    *,
    serving: tuple[str, str, str] | None = None,
    pod_problems: Mapping[str, str] | None = None,
    degraded: tuple[str, str] | None = None,
    previous: Mapping[str, Any] | None,
    now: str,
) -> Status:
    """Status from the spec, the observed Deployments (by name) and the traffic plan the routing
    objects carry (`weights`, effective weights by variant); `now` stamps transitions.

    `serving` is why the routing (router or gateway) cannot serve that plan yet (readiness.py),
    None when it can: Ready means a request to the URL is served as `traffic` says.
    `pod_problems` is why a variant's pods do not run, by variant (pod_problems.py): Degraded.
    `degraded` is the rollout's (reason, message) while it stays rolled back.
    """
    ready = ready_variants(md, deployments)
    observed = [
        (v, deployments.get(naming.variant_object_name(md.name, v.name))) for v in md.variants
    ]
    rows = [_variant_row(md, v, deployment, weights) for v, deployment in observed]
    traffic = ",".join(f"{name}={weight}" for name, weight in weights.items())
    rolling_messages = [gap for v, deployment in observed if (gap := _rollout_gap(v, deployment))]
    failures = [
        failure for v, deployment in observed if (failure := _rollout_failure(v, deployment))
    ]
    pods_failing = [
        f"{v.name}: {problem}" for v in md.variants if (problem := (pod_problems or {}).get(v.name))
    ]
    live_not_ready = [v.name for v in md.variants if v.weight > 0 and v.name not in ready]
    if not any(weights.values()):
        ready_condition = (
            "False",
            "NoVariantReady",
            "no variant with a traffic weight is ready, so no traffic is routed",
        )
    elif serving is not None:
        ready_condition = serving
    elif live_not_ready:
        ready_condition = (
            "False",
            "VariantsNotReady",
            f"not ready: {', '.join(live_not_ready)}; their share goes to ready variants "
            f"(traffic {traffic})",
        )
    else:
        ready_condition = ("True", "AllVariantsReady", f"traffic {traffic}")
    progressing = (
        ("True", "RollingOut", "; ".join(rolling_messages))
        if rolling_messages
        else ("False", "RolloutComplete", "every variant runs its desired replicas")
    )
    if failures:
        degraded_condition = ("True", "RolloutFailed", "; ".join([*failures, *pods_failing]))
    elif pods_failing:
        degraded_condition = ("True", "PodsFailing", "; ".join(pods_failing))
    elif degraded is not None:
        degraded_condition = ("True", *degraded)
    else:
        degraded_condition = ("False", "AsExpected", "no problem observed")
    status: Status = {
        "observedGeneration": md.generation,
        "url": _url(md),
        "readyVariants": f"{len(ready)}/{len(md.variants)}",
        "traffic": traffic,
        "conditions": _conditions(
            (ready_condition, progressing, degraded_condition), md.generation, previous, now
        ),
        "variants": rows,
    }
    shadow = describe_shadow(md)
    if shadow:
        status["shadow"] = shadow
    return status


def describe_shadow(md: ModelDeployment) -> str:
    """What the shadow variant gets and who compares its answers ("" without a shadow)."""
    shadow = md.routing.shadow
    if shadow is None:
        return ""
    copies = f"{shadow.variant} gets a copy of {shadow.percent}% of the weighted requests"
    if md.routing.mode == "gateway":
        return (
            f"{copies} (HTTPRoute RequestMirror); the Gateway discards its answers and makes no "
            "comparison: use routing mode router to compare them"
        )
    return (
        f"{copies}; the router compares its answers with the live variant's "
        "(metrics modeldeploy_router_shadow_*)"
    )


def compute_failed_status(
    generation: int,
    reason: str,
    message: str,
    *,
    previous: Mapping[str, Any] | None,
    now: str,
) -> Status:
    """Status for a generation the operator cannot act on (invalid spec, objects refused).

    What was observed before (url, traffic, variant rows) is still true and stays.
    """
    kept = {
        k: v for k, v in (previous or {}).items() if k not in ("observedGeneration", "conditions")
    }
    return {
        **kept,
        "observedGeneration": generation,
        "conditions": _conditions(
            (("False", reason, message), ("False", reason, message), ("True", reason, message)),
            generation,
            previous,
            now,
        ),
    }


def compute_events(previous: Mapping[str, Any] | None, status: Mapping[str, Any]) -> list[Event]:
    """Events worth telling a human: condition changes and traffic shifts.

    Conditions that change for one cause (a refused spec turns Ready False and Degraded True
    with the same reason and message) make one event, not one per condition.
    """
    before = {c["type"]: c for c in (previous or {}).get("conditions", [])}
    changes: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for condition in status["conditions"]:
        old = before.get(condition["type"])
        degraded = (condition["type"], condition["status"]) == ("Degraded", "True")
        bad = degraded or (condition["type"], condition["status"]) == ("Ready", "False")
        # A new object is not ready yet by nature: only a change, or Degraded from the start,
        # is news.
        if (old is None and not degraded) or (
            old is not None and old["status"] == condition["status"]
        ):
            continue
        cause = (condition["reason"], condition["message"])
        changes.setdefault(cause, []).append((f"{condition['type']}={condition['status']}", bad))
    events = [
        Event(
            type="Warning" if any(bad for _, bad in changed) else "Normal",
            reason=reason,
            message=f"{', '.join(what for what, _ in changed)}: {message}",
        )
        for (reason, message), changed in changes.items()
    ]
    old_traffic = (previous or {}).get("traffic")
    new_traffic = status.get("traffic")
    if old_traffic and new_traffic and old_traffic != new_traffic:
        events.append(Event("Normal", "TrafficShifted", f"traffic {old_traffic} -> {new_traffic}"))
    return events


def _variant_row(
    md: ModelDeployment,
    variant: Variant,
    deployment: Mapping[str, Any] | None,
    weights: Mapping[str, int],
) -> dict[str, Any]:
    name = naming.variant_object_name(md.name, variant.name)
    row: dict[str, Any] = {
        "name": variant.name,
        "desiredReplicas": _desired_replicas(variant, deployment),
        "readyReplicas": _int(deployment, "readyReplicas"),
        "weight": variant.weight,
        "effectiveWeight": weights[variant.name],
        "ready": _int(deployment, "readyReplicas") > 0,
        "modelSha256": variant.model.sha256,
        "service": name,
    }
    image = _server_image(deployment)
    if image:
        row["image"] = image
    return row


def _desired_replicas(variant: Variant, deployment: Mapping[str, Any] | None) -> int:
    # With autoscaling the HPA sets the Deployment's replicas; the Deployment is the truth.
    replicas = (deployment or {}).get("spec", {}).get("replicas")
    return int(replicas) if replicas is not None else variant.min_replicas


def _rollout_gap(variant: Variant, deployment: Mapping[str, Any] | None) -> str:
    """Why this variant has not finished rolling out, or "" when it has."""
    if deployment is None:
        return f"{variant.name}: Deployment not created yet"
    desired = _desired_replicas(variant, deployment)
    status = deployment.get("status", {})
    generation = deployment.get("metadata", {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return f"{variant.name}: new spec not yet observed by the Deployment controller"
    updated, ready, total = (
        _int(deployment, k) for k in ("updatedReplicas", "readyReplicas", "replicas")
    )
    if updated < desired or ready < desired or total > updated:
        return f"{variant.name}: {ready}/{desired} ready, {updated} updated"
    # Old pods still answer while they terminate (preStop, then their drain), over the
    # connections clients keep alive to them: the rollout is over once they are gone.
    terminating = _int(deployment, "terminatingReplicas")
    if terminating:
        return f"{variant.name}: {ready}/{desired} ready, {terminating} terminating"
    return ""


def _rollout_failure(variant: Variant, deployment: Mapping[str, Any] | None) -> str:
    for condition in (deployment or {}).get("status", {}).get("conditions", []):
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return f"{variant.name}: {condition.get('message', 'replica failure')}"
        if (
            condition.get("type") == "Progressing"
            and condition.get("status") == "False"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return f"{variant.name}: {condition.get('message', 'rollout deadline exceeded')}"
    return ""


def _url(md: ModelDeployment) -> str:
    if md.routing.mode == "router":
        return naming.router_url(md.name, md.namespace)
    if md.routing.mode == "gateway" and md.routing.gateway and md.routing.gateway.hostnames:
        return f"http://{md.routing.gateway.hostnames[0]}{md.routing.gateway.path_prefix}"
    return ""


def render_conditions(
    values: Sequence[tuple[str, str, str, str]],
    generation: int,
    previous: Mapping[str, Any] | None,
    now: str,
) -> list[dict[str, Any]]:
    """Conditions from (type, status, reason, message) rows, keeping each one's transition time
    from `previous` while its status stays."""
    before = {c.get("type"): c for c in (previous or {}).get("conditions", [])}
    conditions = []
    for type_, status, reason, message in values:
        old = before.get(type_, {})
        # The transition time moves only when the status does (Kubernetes conventions).
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        conditions.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or now,
                "observedGeneration": generation,
            }
        )
    return conditions


def _conditions(
    values: Sequence[tuple[str, str, str]],
    generation: int,
    previous: Mapping[str, Any] | None,
    now: str,
) -> list[dict[str, Any]]:
    rows = [(t, *v) for t, v in zip(CONDITION_TYPES, values, strict=True)]
    return render_conditions(rows, generation, previous, now)


def _server_image(deployment: Mapping[str, Any] | None) -> str:
    containers = (deployment or {}).get("spec", {}).get("template", {}).get("spec", {})
    for container in containers.get("containers", []):
        if container.get("name") == "server":
            return str(container.get("image", ""))
    return ""


def _int(deployment: Mapping[str, Any] | None, key: str) -> int:
    return int((deployment or {}).get("status", {}).get(key) or 0)
