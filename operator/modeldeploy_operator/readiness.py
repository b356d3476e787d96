"""Is the ModelDeployment's URL servable as the status says? The routing half of `Ready`.

Router mode: the router Deployment has an available replica and every ready endpoint of the
router Service (its EndpointSlices) runs a pod that acknowledged the current routes version in the
status of the RouteTable. Gateway mode: every parent Gateway listed in the HTTPRoute's status
accepted it and resolved its backends, for the route's current generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from modeldeploy_operator import contract, naming
from modeldeploy_operator.spec import ModelDeployment

Verdict = tuple[str, str, str]  # (status, reason, message) of the Ready condition when not servable
# Each parent's conditions that must be True, with the Ready reason when one is not.
PARENT_CONDITIONS = (("Accepted", "GatewayNotAccepted"), ("ResolvedRefs", "RefsUnresolved"))


def router_verdict(
    md: ModelDeployment,
    owned: Mapping[tuple[str, str], Mapping[str, Any]],
    slices: Sequence[Mapping[str, Any]],
    routes_version: str,
) -> Verdict | None:
    """Why the router cannot serve the current routes yet, or None when it can."""
    name = naming.router_object_name(md.name)
    deployment = owned.get(("Deployment", name))
    # Available, not merely ready: a pod is available once it has been ready for the router
    # Deployment's minReadySeconds, which gives kube-proxy time to send the Service's traffic to it.
    available = int(((deployment or {}).get("status") or {}).get("availableReplicas") or 0)
    if available == 0:
        return "False", "RouterNotReady", f"router Deployment {name} has no available replica"
    pods = endpoint_pods(owned.get(("Service", name)), slices, ready_only=True)
    if not pods:
        return "False", "RoutesPending", f"router Service {name} has no ready endpoint yet"
    acks = routes_acks(owned.get(route_table_key(md.name)))
    pending = sorted(pod for pod in pods if acks.get(pod) != routes_version)
    if pending:
        return (
            "False",
            "RoutesPending",
            f"routes version {routes_version} not yet applied by router pods {', '.join(pending)}",
        )
    return None


def gateway_verdict(route: Mapping[str, Any] | None) -> Verdict | None:
    """Why the HTTPRoute is not serving (its parents' Accepted/ResolvedRefs), or None."""
    if route is None:
        return "False", "NoGatewayAccepted", "the HTTPRoute is not created yet"
    name = route["metadata"]["name"]
    generation = route["metadata"].get("generation", 0)
    parents = (route.get("status") or {}).get("parents") or []
    if not parents:
        return "False", "NoGatewayAccepted", f"no gateway has accepted HTTPRoute {name} yet"
    for parent in parents:
        ref = parent.get("parentRef", {})
        where = f"{ref.get('namespace', route['metadata'].get('namespace'))}/{ref.get('name')}"
        conditions = {c.get("type"): c for c in parent.get("conditions", [])}
        for type_, reason in (
            ("Accepted", "GatewayNotAccepted"),
            ("ResolvedRefs", "RefsUnresolved"),
        ):
            condition = conditions.get(type_)
            if condition is None or condition.get("observedGeneration", generation) < generation:
                return (
                    "False",
                    "GatewayPending",
                    f"gateway {where} has not yet reported {type_} for HTTPRoute {name} "
                    f"generation {generation}",
                )
            if condition.get("status") != "True":
                return (
                    "False",
                    reason,
                    f"gateway {where}: {type_}={condition.get('status')} "
                    f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(),
                )
    return None


def route_table_key(md_name: str) -> tuple[str, str]:
    """(kind, name) of the ModelDeployment's RouteTable among its children."""
    return contract.ROUTE_TABLE_KIND, naming.route_table_name(md_name)


def stale_acks(
    route_table: Mapping[str, Any] | None,
    service: Mapping[str, Any] | None,
    slices: Sequence[Mapping[str, Any]],
) -> tuple[str, ...]:
    """Pods whose ack is on the RouteTable but that are no endpoint of the router Service.

    Decided only while the Service has EndpointSlices: right after a Service is recreated its
    slices are not there yet, and every ack would look stale.
    """
    if not _current_slices(service, slices):
        return ()
    endpoints = endpoint_pods(service, slices, ready_only=False)
    return tuple(sorted(pod for pod in routes_acks(route_table) if pod not in endpoints))


def routes_version(desired: Sequence[Mapping[str, Any]], md: ModelDeployment) -> str:
    """The version the RouteTable about to be applied carries (router mode)."""
    wanted = route_table_key(md.name)
    for obj in desired:
        if (obj["kind"], obj["metadata"]["name"]) == wanted:
            return str(obj["spec"]["routes"].get("version", ""))
    return ""


def routes_acks(route_table: Mapping[str, Any] | None) -> dict[str, str]:
    """Pod name -> routes version it acknowledged, from the RouteTable's status."""
    acks = ((route_table or {}).get("status") or {}).get("acks") or {}
    return {str(pod): str(version) for pod, version in acks.items()}


def endpoint_pods(
    service: Mapping[str, Any] | None, slices: Sequence[Mapping[str, Any]], *, ready_only: bool
) -> set[str]:
    """Names of the pods behind the Service's endpoints (only ready ones if `ready_only`)."""
    pods = set()
    for slice_ in _current_slices(service, slices):
        for endpoint in slice_.get("endpoints") or []:
            target = endpoint.get("targetRef") or {}
            # An unset `ready` means unknown, which consumers are told to read as ready.
            ready = (endpoint.get("conditions") or {}).get("ready") is not False
            if target.get("kind") == "Pod" and target.get("name") and (ready or not ready_only):
                pods.add(target["name"])
    return pods


def _current_slices(
    service: Mapping[str, Any] | None, slices: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The slices of this very Service (a recreated Service's old slices do not count)."""
    if service is None:
        return []
    uid = service["metadata"].get("uid")
    return [
        s
        for s in slices
        if any(ref.get("uid") == uid for ref in s["metadata"].get("ownerReferences", []))
    ]
