"""The plan: from one snapshot of a ModelDeployment and its children, everything the operator
should do and say, as a value.

`plan` is pure: the same snapshot, image and clock give the same plan, and tests assert on it
without an API server. One traffic plan (the effective weights) feeds both the routing objects and
the status, so they cannot disagree. `settle` folds what acting on the plan could not do (objects
the API server refused) into the status and events, keeping what is still true.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from modeldeploy_operator import naming, readiness
from modeldeploy_operator.contract import ROUTE_TABLE_KIND
from modeldeploy_operator.gate_jobs import gate_verdicts, render_with_gates
from modeldeploy_operator.pod_problems import rollout_incomplete, variant_pod_problems
from modeldeploy_operator.readiness import (
    Verdict,
    gateway_verdict,
    route_table_key,
    router_verdict,
    routes_version,
    stale_acks,
)
from modeldeploy_operator.render import render_router_identity
from modeldeploy_operator.rollout import VariantMetrics
from modeldeploy_operator.rollout_control import plan_md_rollout
from modeldeploy_operator.rollout_metrics import RouterCounters
from modeldeploy_operator.spec import InvalidSpecError, parse_model_deployment
from modeldeploy_operator.status import (
    Event,
    Status,
    compute_events,
    compute_failed_status,
    compute_status,
    ready_variants,
)
from modeldeploy_operator.traffic import compute_effective_weights

Manifest = dict[str, Any]
Key = tuple[str, str]  # (kind, name): unique among the kinds one ModelDeployment owns


@dataclass(frozen=True)
class Snapshot:
    """What one reconcile observed, read once before planning."""

    model_deployment: Mapping[str, Any]
    # Every object labelled as this ModelDeployment's, of every kind it can own.
    children: Sequence[Mapping[str, Any]] = ()
    # The EndpointSlices of the router Service (named after the ModelDeployment).
    endpoint_slices: Sequence[Mapping[str, Any]] = ()
    # Its variant pods, read only while a variant Deployment is not fully available
    # (`pods_worth_reading`): they say why (a model refused by its sha256, a crash, a pull error).
    pods: Sequence[Mapping[str, Any]] = ()
    # With a spec.rollout: each variant's user traffic over the current step's window, by variant.
    metrics: Mapping[str, VariantMetrics] = field(default_factory=dict)
    # The routers' counters read for it now (the direct source), a new window's baseline.
    counters: RouterCounters | None = None
    # The pods of its gate Jobs (their termination messages hold the verdicts).
    gate_pods: Sequence[Mapping[str, Any]] = ()
    # The router identity of its namespace (render_router_identity) as it stands: shared by the
    # namespace's routers, owned by no ModelDeployment.
    router_identity: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class Recreate:
    """An observed child whose drift apply cannot undo: delete it (uid precondition), then apply."""

    observed: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class Failure:
    """A child the API server refused (or could not take now, `transient`)."""

    object: str  # "Kind/name"
    message: str
    transient: bool = False


@dataclass(frozen=True)
class Plan:
    name: str  # of the ModelDeployment
    generation: int
    # Every desired child, carrying the hash of its manifest (APPLIED_HASH), and what applying
    # would change: those of them, and first the namespace's router identity where it is missing
    # or edited (the others are skipped: an unchanged ModelDeployment's reconcile writes nothing).
    desired: tuple[Manifest, ...]
    apply: tuple[Manifest, ...]
    recreate: tuple[Recreate, ...]
    prune: tuple[Mapping[str, Any], ...]
    # Router pods whose routes ack stays on the RouteTable although they are no endpoint any more.
    prune_acks: tuple[str, ...]
    traffic: Mapping[str, int]  # effective weights, as the routing objects and status carry them
    status: Status  # the status if every object is applied
    events: tuple[Event, ...]
    invalid: str | None  # why this generation cannot be acted on (nothing to apply then)
    previous: Mapping[str, Any] | None = field(repr=False)
    now: str = field(repr=False)
    # When to look again regardless of any watch event (a rollout step's window), None: at resync.
    requeue_after_s: float | None = None


@dataclass(frozen=True)
class Settled:
    status: Status
    events: tuple[Event, ...]
    new_failures: tuple[Failure, ...]  # not already reported by the previous status


def plan(snapshot: Snapshot, *, server_image: str, now: str) -> Plan:
    """Desired children, drift that needs a recreate, what to prune, traffic, status and events."""
    obj = snapshot.model_deployment
    previous = obj.get("status")
    generation = int(obj["metadata"].get("generation", 1))
    try:
        md = parse_model_deployment(obj)
    except InvalidSpecError as error:
        status = compute_failed_status(
            generation, "InvalidSpec", str(error), previous=previous, now=now
        )
        return Plan(
            name=obj["metadata"]["name"],
            generation=generation,
            desired=(),
            apply=(),
            recreate=(),
            prune=(),
            prune_acks=(),
            traffic={},
            status=status,
            events=tuple(compute_events(previous, status)),
            invalid=str(error),
            previous=previous,
            now=now,
        )
    owned = {key(o): o for o in snapshot.children if owned_by(o, md.uid)}
    deployments = {name: o for (kind, name), o in owned.items() if kind == "Deployment"}
    ready = ready_variants(md, deployments)
    jobs = [o for (kind, _), o in owned.items() if kind == "Job"]
    verdicts = gate_verdicts(md, snapshot.gate_pods, jobs)
    rollout = plan_md_rollout(md, previous, snapshot.metrics, verdicts, now, snapshot.counters)
    # With a rollout the routes carry its weights; the spec's stay the destination.
    routed = rollout.weights if rollout is not None else md.spec_weights
    traffic = compute_effective_weights(routed, ready)
    # A gated variant's gate runs once it serves (against its Service), for its current digest.
    desired = tuple(
        with_applied_hash(keep_cluster_ip(o, owned.get(key(o))))
        for o in render_with_gates(
            md,
            server_image=server_image,
            weights=traffic,
            serving=ready,
            probes=rollout.probes if rollout is not None else None,
            mirror=rollout.mirror if rollout is not None else None,
        )
    )
    wanted = {key(o) for o in desired}
    # The router pods' ServiceAccount must exist before their Deployment's pods are created.
    identity: tuple[Manifest, ...] = ()
    if md.routing.mode == "router":
        identity = tuple(with_applied_hash(o) for o in render_router_identity(md.namespace))
    observed_identity = {key(o): o for o in snapshot.router_identity}
    # Each desired object with what stands of it now.
    pairs = (
        *((o, observed_identity.get(key(o))) for o in identity),
        *((o, owned.get(key(o))) for o in desired),
    )
    recreate = tuple(
        Recreate(observed, reason)
        for manifest, observed in pairs
        if observed is not None and (reason := recreate_reason(observed, manifest))
    )
    recreated = {key(r.observed) for r in recreate}
    apply = tuple(o for o, observed in pairs if key(o) in recreated or not up_to_date(observed, o))
    serving: Verdict | None = None
    prune_acks: tuple[str, ...] = ()
    if md.routing.mode == "router":
        version = routes_version(desired, md)
        serving = router_verdict(md, owned, snapshot.endpoint_slices, version)
        prune_acks = stale_acks(
            owned.get(route_table_key(md.name)),
            owned.get(("Service", naming.router_object_name(md.name))),
            snapshot.endpoint_slices,
        )
    elif md.routing.mode == "gateway":
        serving = gateway_verdict(owned.get(("HTTPRoute", naming.router_object_name(md.name))))
    status = compute_status(
        md,
        deployments,
        traffic,
        serving=serving,
        pod_problems=variant_pod_problems(snapshot.pods),
        degraded=rollout.degraded if rollout is not None else None,
        previous=previous,
        now=now,
    )
    events = compute_events(previous, status)
    if rollout is not None:
        status["rollout"] = rollout.status
        events.extend(rollout.events)
    return Plan(
        name=md.name,
        generation=md.generation,
        desired=desired,
        apply=apply,
        recreate=recreate,
        prune=tuple(o for k, o in owned.items() if k not in wanted),
        prune_acks=prune_acks,
        traffic=traffic,
        status=status,
        events=tuple(events),
        invalid=None,
        previous=previous,
        now=now,
        requeue_after_s=rollout.requeue_after_s if rollout is not None else None,
    )


def settle(plan: Plan, failures: Sequence[Failure]) -> Settled:
    """The status and events once acting on `plan` is over, with `failures` among its objects.

    A refused object is named with the API server's message (Degraded), the ModelDeployment is
    not Ready, and nothing that is still true is forgotten: the variant rows stay as observed,
    and when a routing object was not applied the traffic shown stays what it last carried.
    """
    if not failures:
        return Settled(plan.status, plan.events, ())
    reason = "ApplyRejected" if any(not f.transient for f in failures) else "ApplyFailed"
    lines = [f"{f.object}: {f.message}{' (will retry)' if f.transient else ''}" for f in failures]
    message = "; ".join(lines)
    status = dict(plan.status)
    routing = {describe(o) for o in plan.desired if key(o) in _routing_keys(plan.desired)}
    if any(f.object in routing for f in failures):
        _keep_previous_traffic(status, plan.previous)
    status["conditions"] = compute_failed_status(
        plan.generation, reason, message, previous=plan.previous, now=plan.now
    )["conditions"]
    degraded = _condition(plan.previous, "Degraded") or {}
    told = degraded.get("message", "") if degraded.get("status") == "True" else ""
    new = tuple(f for f, line in zip(failures, lines, strict=True) if line not in told)
    # One Warning per newly failing object rather than one per condition that flipped with it.
    events = [e for e in compute_events(plan.previous, status) if e.reason != reason]
    events.extend(Event("Warning", reason, f"{f.object}: {f.message}") for f in new)
    return Settled(status, tuple(events), new)


def keep_cluster_ip(desired: Manifest, observed: Mapping[str, Any] | None) -> Manifest:
    """`desired` without its headless `clusterIP: None` when the Service already has a ClusterIP.

    The variant Services are rendered headless in router mode, where the router reaches the pods
    through either kind, so one created with a ClusterIP (by a release before that, or in another
    mode) keeps it: clusterIP cannot change, and recreating the Service would leave its name
    without an address for a moment, and in DNS caches for longer. Only a Service that needs a
    ClusterIP and has none is recreated (`recreate_reason`).
    """
    if desired["kind"] != "Service" or desired["spec"].get("clusterIP") != "None":
        return desired
    if (observed or {}).get("spec", {}).get("clusterIP") in (None, "None"):
        return desired
    spec = {k: v for k, v in desired["spec"].items() if k != "clusterIP"}
    return {**desired, "spec": spec}


def with_applied_hash(manifest: Manifest) -> Manifest:
    """`manifest` annotated with a hash of itself: the next reconcile knows what it last applied."""
    # orjson writes what json.dumps(sort_keys=True, separators=(",", ":")) did for ASCII text, so
    # hashes recorded by earlier versions still match; it is 10x faster, on every planned object.
    digest = hashlib.sha256(orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)).hexdigest()[:20]
    meta = manifest["metadata"]
    annotations = {**meta.get("annotations", {}), naming.APPLIED_HASH: digest}
    return {**manifest, "metadata": {**meta, "annotations": annotations}}


def up_to_date(observed: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Applying `desired` (with its hash) would change nothing on `observed`.

    The hash says `desired` is what was applied last, so no field we set then and not now is
    left to remove; every field `desired` sets still holding its value says nobody edited one
    since (a hand edit is drift to repair). Fields others added (defaults, status, their own
    annotations) do not count, as server-side apply leaves them too.
    """
    if observed is None:
        return False
    applied = (observed.get("metadata", {}).get("annotations") or {}).get(naming.APPLIED_HASH)
    return applied == desired["metadata"]["annotations"][naming.APPLIED_HASH] and _holds(
        observed, desired
    )


def _holds(observed: Any, desired: Any) -> bool:
    """Every field of `desired` is in `observed` with the same value (lists item by item)."""
    # Plain dict and list checks: both sides are decoded JSON, and abc checks cost more here.
    if type(desired) is dict:
        return type(observed) is dict and all(
            _holds(observed[k], v) if k in observed else _empty(v) for k, v in desired.items()
        )
    if type(desired) is list:
        return (
            type(observed) is list
            and len(observed) == len(desired)
            and all(_holds(o, d) for o, d in zip(observed, desired, strict=True))
        )
    if type(desired) in (int, float):
        # A custom resource's integral float comes back from the API server as an int.
        return type(observed) in (int, float) and bool(observed == desired)
    return bool(observed == desired and type(observed) is type(desired))


def _empty(value: Any) -> bool:
    # The API server drops empty maps and lists; applying them again would change nothing.
    return value in ({}, [], None)


def recreate_reason(observed: Mapping[str, Any], desired: Mapping[str, Any]) -> str:
    """Why `observed` must be deleted and created again to become `desired`, or "".

    Server-side apply cannot undo every edit: Service ports are a list keyed by port and
    protocol (an edited port stays beside the one applied, and their names then collide),
    selector keys added by someone else stay, and immutable fields cannot change at all.
    """
    kind = desired["kind"]
    have, want = observed.get("spec", {}), desired.get("spec", {})
    if kind == "Service":
        if _port_keys(have) != _port_keys(want):
            return (
                f"ports {_describe_ports(have)} cannot be changed to {_describe_ports(want)} "
                "by apply"
            )
        if have.get("selector") != want.get("selector"):
            return "selector edited: keys added by another field manager cannot be removed"
        if have.get("type", "ClusterIP") != want.get("type", "ClusterIP"):
            return f"type {have.get('type')} cannot be changed back to {want.get('type')}"
        if have.get("clusterIP") == "None" and want.get("clusterIP") != "None":
            return "a headless Service cannot be given a ClusterIP (spec.clusterIP is immutable)"
    elif kind == "Deployment":
        if have.get("selector") != want.get("selector"):
            return "spec.selector is immutable"
    elif kind == "RoleBinding" and observed.get("roleRef") != desired.get("roleRef"):
        return "roleRef is immutable"
    elif kind == "Job" and _template_differs(have.get("template", {}), want["template"]):
        return "a Job's pod template is immutable"
    return ""


def identity_intact(observed: Mapping[str, Any]) -> bool:
    """Whether an object of a namespace's router identity is as the operator applies it (the watch
    event of our own write, not drift to repair)."""
    wanted = {
        key(o): with_applied_hash(o)
        for o in render_router_identity(observed["metadata"].get("namespace", ""))
    }.get(key(observed))
    return (
        wanted is not None
        and up_to_date(observed, wanted)
        and not recreate_reason(observed, wanted)
    )


def plan_inputs(kind: str, obj: Mapping[str, Any] | None) -> Any:
    """What `plan` reads from a child of `kind` (None: absent) beyond the fields this operator
    applies: a child event that changes none of it (the echo of our own apply) needs no new plan."""
    if kind == "Deployment":
        # Status rows show the Deployment as it stands (replicas under an HPA, the image, its
        # generation against observedGeneration), so its creation is news too.
        return None if obj is None else (obj.get("spec"), obj.get("status"))
    if kind == "HTTPRoute":
        # Its parents' conditions, and the generation they must have observed.
        meta = (obj or {}).get("metadata", {})
        return meta.get("generation"), (obj or {}).get("status")
    if kind == ROUTE_TABLE_KIND:
        return readiness.routes_acks(obj)
    return None


def pods_worth_reading(children: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some variant Deployment among `children` is not fully rolled out, so that its
    pods may say why."""
    return any(
        o.get("kind") == "Deployment"
        and o.get("metadata", {}).get("labels", {}).get(naming.COMPONENT)
        == naming.COMPONENT_VARIANT
        and rollout_incomplete(o)
        for o in children
    )


def owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    """Ours to change or prune only if this very ModelDeployment (not a namesake) controls it."""
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in obj.get("metadata", {}).get("ownerReferences", [])
    )


def key(obj: Mapping[str, Any]) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def describe(obj: Mapping[str, Any]) -> str:
    """ "Kind/name", as logs, events and conditions name an object."""
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _template_differs(have: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Whether the Job's pod template lacks what we set (the Job controller adds labels)."""
    labels = have.get("metadata", {}).get("labels") or {}
    wanted = want.get("metadata", {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in wanted.items()):
        return True
    containers = {c.get("name"): c for c in have.get("spec", {}).get("containers", [])}
    return any(
        containers.get(c["name"], {}).get(field) != c.get(field)
        for c in want["spec"]["containers"]
        for field in ("image", "args")
    )


def _routing_keys(desired: Sequence[Mapping[str, Any]]) -> set[Key]:
    """The objects that carry the traffic split: the RouteTable or the HTTPRoute."""
    return {key(o) for o in desired if o["kind"] in (ROUTE_TABLE_KIND, "HTTPRoute")}


def _keep_previous_traffic(status: Status, previous: Mapping[str, Any] | None) -> None:
    before = previous or {}
    if "traffic" in before:
        status["traffic"] = before["traffic"]
    effective = {r["name"]: r.get("effectiveWeight") for r in before.get("variants", [])}
    status["variants"] = [
        {**row, "effectiveWeight": effective.get(row["name"], 0)} for row in status["variants"]
    ]


def _condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in (status or {}).get("conditions", []) if c["type"] == type_), None)


def _port_keys(spec: Mapping[str, Any]) -> set[tuple[int, str]]:
    return {(p.get("port"), p.get("protocol", "TCP")) for p in spec.get("ports", [])}


def _describe_ports(spec: Mapping[str, Any]) -> str:
    return ",".join(f"{port}/{protocol}" for port, protocol in sorted(_port_keys(spec)))
