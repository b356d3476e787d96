"""plan and settle: the pure core of one reconcile, asserted without an API server."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from modeldeploy_operator import naming
from modeldeploy_operator.plan import (
    Failure,
    Plan,
    Snapshot,
    describe,
    identity_intact,
    plan,
    plan_inputs,
    recreate_reason,
    settle,
    with_applied_hash,
)
from modeldeploy_operator.render import render_objects, render_router_identity
from modeldeploy_operator.spec import parse_model_deployment
from tests.operator.builders import model_deployment, variant

IMAGE = "registry.example/modeldeploy-server:1.0"
T0 = "2026-11-21T09:00:00Z"
T1 = "2026-11-21T09:05:00Z"
GATEWAY = {"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw"}]}}


def stored(obj: dict[str, Any], uid: str = "uid-1") -> dict[str, Any]:
    """A child as the API server returns it: what we applied plus uid, version and defaults."""
    obj = copy.deepcopy(obj)
    obj["metadata"].update(uid=f"{uid}-{obj['kind']}-{obj['metadata']['name']}")
    obj["metadata"]["resourceVersion"] = "7"
    if obj["kind"] == "Service":
        obj["spec"].setdefault("clusterIP", "10.0.0.9")  # "None" stays: a headless Service
        obj["spec"].update(sessionAffinity="None", ipFamilies=["IPv4"])
    return obj


def children(md: dict[str, Any], ready: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Every child of `md` as applied, variant Deployments with `ready` ready replicas."""
    objects = [stored(o) for o in render_objects(parse_model_deployment(md), server_image=IMAGE)]
    for obj in objects:
        if obj["kind"] == "Deployment":
            count = (ready or {}).get(obj["metadata"]["name"], 0)
            replicas = obj["spec"].get("replicas", 1)
            obj["metadata"]["generation"] = 1
            obj["status"] = {
                "observedGeneration": 1,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": count,
                "availableReplicas": count,
            }
    return objects


def routed_weights(objects: tuple[dict[str, Any], ...]) -> dict[str, int]:
    """The split the routing object carries: routes.json or the HTTPRoute's weighted rule."""
    for obj in objects:
        if obj["kind"] == "RouteTable":
            routes = obj["spec"]["routes"]
            return {v["name"]: v["weight"] for v in routes["variants"]}
        if obj["kind"] == "HTTPRoute":
            split = obj["spec"]["rules"][-1]["backendRefs"]
            return {b["name"].removeprefix("iris-"): b["weight"] for b in split}
    raise AssertionError("no routing object")


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.mark.parametrize("routing", [None, GATEWAY], ids=["router", "gateway"])
@pytest.mark.parametrize(
    "ready",
    [{}, {"iris-v1": 1}, {"iris-v2": 1}, {"iris-v1": 2, "iris-v2": 1}],
    ids=["none", "v1", "v2", "both"],
)
def test_routes_and_status_come_from_one_traffic_plan(
    routing: dict[str, Any] | None, ready: dict[str, int]
) -> None:
    md = model_deployment(routing=routing)
    planned = plan(Snapshot(md, children(md, ready)), server_image=IMAGE, now=T0)
    routed = routed_weights(planned.apply)
    assert routed == dict(planned.traffic)
    assert planned.status["traffic"] == ",".join(f"{n}={w}" for n, w in routed.items())
    assert {r["name"]: r["effectiveWeight"] for r in planned.status["variants"]} == routed
    # Only variants observed ready in this snapshot get traffic.
    assert {n for n, w in routed.items() if w} <= {n.removeprefix("iris-") for n in ready}


def test_one_snapshot_gives_one_plan() -> None:
    md = model_deployment()
    snapshot = Snapshot(md, children(md, {"iris-v1": 1}))
    first = plan(snapshot, server_image=IMAGE, now=T0)
    assert plan(snapshot, server_image=IMAGE, now=T0) == first
    assert first.traffic == {"v1": 100, "v2": 0}
    assert first.recreate == () and first.prune == ()
    # The same Deployment readiness that chose the traffic fills the rows.
    assert [(r["name"], r["ready"]) for r in first.status["variants"]] == [
        ("v1", True),
        ("v2", False),
    ]


def test_nothing_observed_yet_plans_every_child_and_no_traffic() -> None:
    planned = plan(Snapshot(model_deployment()), server_image=IMAGE, now=T0)
    # The namespace's router identity first: the router pods need their ServiceAccount.
    assert [describe(o) for o in planned.apply] == [
        "ServiceAccount/modeldeploy-router",
        "RoleBinding/modeldeploy-router",
        "Deployment/iris-v1",
        "Service/iris-v1",
        "Deployment/iris-v2",
        "Service/iris-v2",
        "RouteTable/iris-routes",
        "Deployment/iris",
        "Service/iris",
        "PodDisruptionBudget/iris",
    ]
    assert planned.traffic == {"v1": 0, "v2": 0}
    assert conditions(planned.status)["Ready"] == ("False", "NoVariantReady")
    assert planned.invalid is None and planned.events == ()


def test_children_no_longer_wanted_are_pruned_but_not_a_namesakes() -> None:
    old = model_deployment(variants=[variant("v1", 50), variant("v3", 50)])
    new = model_deployment(variants=[variant("v1", 100)])
    observed = children(old)
    foreign = stored(render_objects(parse_model_deployment(old), server_image=IMAGE)[0])
    foreign["metadata"]["name"] = "iris-old"
    foreign["metadata"]["ownerReferences"][0]["uid"] = "another-iris"
    planned = plan(Snapshot(new, [*observed, foreign]), server_image=IMAGE, now=T0)
    assert sorted(describe(o) for o in planned.prune) == ["Deployment/iris-v3", "Service/iris-v3"]


def test_service_port_edit_is_recreated_other_edits_are_applied() -> None:
    md = model_deployment()
    observed = children(md)
    service = next(o for o in observed if describe(o) == "Service/iris-v1")
    deployment = next(o for o in observed if describe(o) == "Deployment/iris-v1")
    service["spec"]["ports"][0]["port"] = 9090  # kubectl patch ... /spec/ports/0/port 9090
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    deployment["spec"]["replicas"] = 5
    planned = plan(Snapshot(md, observed), server_image=IMAGE, now=T0)
    ((recreate),) = planned.recreate
    assert describe(recreate.observed) == "Service/iris-v1"
    assert recreate.observed["metadata"]["uid"] == service["metadata"]["uid"]
    assert "9090/TCP" in recreate.reason and "8080/TCP" in recreate.reason
    # The Deployment edit is undone by apply; it is in the plan like every other child.
    assert "Deployment/iris-v1" in {describe(o) for o in planned.apply}


@pytest.mark.parametrize(
    ("kind", "edit", "expected"),
    [
        ("Service", lambda o: o["spec"]["selector"].update(extra="x"), "selector"),
        ("Service", lambda o: o["spec"].update(type="NodePort"), "type"),
        (
            "Service",
            lambda o: o["spec"]["ports"].append({"name": "m", "port": 9, "protocol": "TCP"}),
            "ports",
        ),
        ("Deployment", lambda o: o["spec"]["selector"]["matchLabels"].update(x="y"), "immutable"),
        ("RoleBinding", lambda o: o["roleRef"].update(name="admin"), "immutable"),
        ("RoleBinding", lambda o: o["subjects"][0].update(name="x"), ""),
        ("Service", lambda o: o["spec"]["ports"][0].update(name="web"), ""),
        ("Service", lambda o: o["spec"]["ports"][0].pop("protocol"), ""),
        ("Deployment", lambda o: o["spec"].update(replicas=5), ""),
        ("RouteTable", lambda o: o["spec"]["routes"].update(variants=[]), ""),
    ],
)
def test_recreate_decisions(kind: str, edit: Any, expected: str) -> None:
    md = model_deployment()
    desired = next(
        o
        for o in (
            *render_objects(parse_model_deployment(md), server_image=IMAGE),
            *render_router_identity("ml"),
        )
        if o["kind"] == kind
    )
    observed = stored(desired)
    edit(observed)
    reason = recreate_reason(observed, desired)
    assert (expected in reason) if expected else reason == "", reason
    assert bool(reason) == bool(expected)


def test_a_headless_variant_service_is_recreated_when_it_needs_a_cluster_ip() -> None:
    """Behind the router the variant Services are headless; with routing `none` users call them
    through a ClusterIP, which a Service cannot be given: the switch recreates them."""
    observed = children(model_deployment())
    md = model_deployment(routing={"mode": "none"})
    planned = plan(Snapshot(md, observed), server_image=IMAGE, now=T0)
    assert sorted(describe(r.observed) for r in planned.recreate) == [
        "Service/iris-v1",
        "Service/iris-v2",
    ]
    assert all("headless Service cannot be given a ClusterIP" in r.reason for r in planned.recreate)


def test_a_variant_service_with_a_cluster_ip_keeps_it_behind_the_router() -> None:
    """A variant Service created with a ClusterIP (routing `none`, or a release before headless
    ones) serves the router as well: it is neither recreated nor sent `clusterIP: None`, which
    the API server would refuse."""
    before = parse_model_deployment(model_deployment(routing={"mode": "none"}))
    observed = [stored(with_applied_hash(o)) for o in render_objects(before, server_image=IMAGE)]
    md = model_deployment()
    planned = plan(Snapshot(md, observed), server_image=IMAGE, now=T0)
    assert planned.recreate == ()
    services = [o for o in planned.desired if o["kind"] == "Service"]
    assert [o["metadata"]["name"] for o in services] == ["iris-v1", "iris-v2", "iris"]
    assert all("clusterIP" not in o["spec"] for o in services)
    # The same Services as the ones observed: nothing to send them.
    applied = {describe(o) for o in planned.apply}
    assert applied.isdisjoint({"Service/iris-v1", "Service/iris-v2"}), applied


def test_unchanged_children_need_no_recreate() -> None:
    md = model_deployment()
    assert plan(Snapshot(md, children(md)), server_image=IMAGE, now=T0).recreate == ()


def test_invalid_spec_plans_nothing_and_keeps_what_was_observed() -> None:
    md = model_deployment()
    good = plan(Snapshot(md, children(md, {"iris-v1": 1})), server_image=IMAGE, now=T0)
    broken = model_deployment(variants=[variant("v1", 60), variant("v2", 60)], generation=2)
    broken["status"] = good.status
    planned = plan(Snapshot(broken, children(md, {"iris-v1": 1})), server_image=IMAGE, now=T1)
    assert planned.invalid and "100" in planned.invalid
    assert planned.apply == () and planned.prune == () and planned.recreate == ()
    assert conditions(planned.status)["Degraded"] == ("True", "InvalidSpec")
    for field in ("traffic", "variants", "readyVariants", "url"):
        assert planned.status[field] == good.status[field]


def test_settle_names_each_refused_object_and_keeps_rows_and_traffic() -> None:
    md = model_deployment()
    before = plan(Snapshot(md, children(md, {"iris-v1": 1})), server_image=IMAGE, now=T0)
    md["status"] = before.status
    # v2 became ready: the new plan moves traffic, but the RouteTable is refused.
    planned = plan(
        Snapshot(md, children(md, {"iris-v1": 1, "iris-v2": 1})), server_image=IMAGE, now=T1
    )
    assert planned.traffic == {"v1": 90, "v2": 10}
    failures = [
        Failure("Service/iris-v1", 'spec.ports[1].name: Duplicate value: "http"'),
        Failure("RouteTable/iris-routes", "admission webhook denied it"),
    ]
    settled = settle(planned, failures)
    degraded = next(c for c in settled.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyRejected")
    assert 'Service/iris-v1: spec.ports[1].name: Duplicate value: "http"' in degraded["message"]
    assert "RouteTable/iris-routes: admission webhook denied it" in degraded["message"]
    assert conditions(settled.status)["Ready"] == ("False", "ApplyRejected")
    # The routes were not written: the traffic shown is what they still carry.
    assert settled.status["traffic"] == before.status["traffic"] == "v1=100,v2=0"
    assert [r["effectiveWeight"] for r in settled.status["variants"]] == [100, 0]
    # Rows are what this snapshot observed (v2 is ready now), not forgotten.
    assert [r["ready"] for r in settled.status["variants"]] == [True, True]
    assert [(e.type, e.reason, e.message) for e in settled.events if e.type == "Warning"] == [
        ("Warning", "ApplyRejected", f"{f.object}: {f.message}") for f in failures
    ]
    assert settled.new_failures == tuple(failures)

    # The same refusal at the next reconcile is not news: no new event, nothing new to log.
    md["status"] = settled.status
    again = plan(
        Snapshot(md, children(md, {"iris-v1": 1, "iris-v2": 1})), server_image=IMAGE, now=T1
    )
    resettled = settle(again, failures)
    assert resettled.status == settled.status
    assert resettled.events == () and resettled.new_failures == ()


def test_settle_without_failures_is_the_plan() -> None:
    md = model_deployment()
    planned = plan(Snapshot(md, children(md, {"iris-v1": 1})), server_image=IMAGE, now=T0)
    settled = settle(planned, [])
    assert (settled.status, settled.events) == (planned.status, planned.events)


def test_transient_failures_are_retried_not_refused() -> None:
    md = model_deployment()
    planned = plan(Snapshot(md, children(md)), server_image=IMAGE, now=T0)
    settled = settle(planned, [Failure("Service/iris", "HTTP 503", transient=True)])
    assert conditions(settled.status)["Degraded"] == ("True", "ApplyFailed")
    degraded = next(c for c in settled.status["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == "Service/iris: HTTP 503 (will retry)"


def test_plan_inputs_tell_an_echo_from_news() -> None:
    md = model_deployment()
    deployment = next(o for o in children(md) if describe(o) == "Deployment/iris-v1")
    echo = copy.deepcopy(deployment)
    echo["metadata"]["resourceVersion"] = "8"
    echo["metadata"]["managedFields"] = [{"manager": "modeldeploy-operator"}]
    assert plan_inputs("Deployment", echo) == plan_inputs("Deployment", deployment)
    became_ready = copy.deepcopy(echo)
    became_ready["status"]["readyReplicas"] = 1
    assert plan_inputs("Deployment", became_ready) != plan_inputs("Deployment", deployment)
    assert plan_inputs("Deployment", None) != plan_inputs("Deployment", deployment)
    # What apply sets on other kinds is not read by the plan: creating one is not news.
    service = next(o for o in children(md) if o["kind"] == "Service")
    assert plan_inputs("Service", None) == plan_inputs("Service", service)


def router_ready(objects: list[dict[str, Any]], replicas: int = 2) -> None:
    router = next(o for o in objects if describe(o) == "Deployment/iris")
    router["status"].update(readyReplicas=replicas, availableReplicas=replicas)


def endpoint_slice(
    service: dict[str, Any], pods: dict[str, bool], name: str = "iris-abc"
) -> dict[str, Any]:
    """What the EndpointSlice controller writes for the router Service: its labels, an owner
    reference to it, one endpoint per pod with its readiness."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {**service["metadata"]["labels"], "kubernetes.io/service-name": "iris"},
            "ownerReferences": [
                {"kind": "Service", "name": "iris", "uid": service["metadata"]["uid"]}
            ],
        },
        "endpoints": [
            {"conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod}}
            for pod, ready in pods.items()
        ],
    }


def acked(objects: list[dict[str, Any]], acks: dict[str, str]) -> None:
    route_table = next(o for o in objects if o["kind"] == "RouteTable")
    route_table["status"] = {"acks": dict(acks)}


def ready_reason(md: dict[str, Any], objects: list[dict[str, Any]], slices: Any = ()) -> Any:
    planned = plan(Snapshot(md, objects, slices), server_image=IMAGE, now=T0)
    return conditions(planned.status)["Ready"], planned


def test_router_mode_ready_needs_routers_serving_the_current_routes() -> None:
    md = model_deployment()
    objects = children(md, {"iris-v1": 1, "iris-v2": 1})
    # Every variant is ready, but the only entry point is not.
    assert ready_reason(md, objects)[0] == ("False", "RouterNotReady")
    # Ready router pods that are not yet available (ready for the Deployment's minReadySeconds)
    # may not be in kube-proxy's rules yet: still not servable.
    router = next(o for o in objects if describe(o) == "Deployment/iris")
    router["status"].update(readyReplicas=2, availableReplicas=0)
    assert ready_reason(md, objects)[0] == ("False", "RouterNotReady")
    router_ready(objects)
    assert ready_reason(md, objects)[0] == ("False", "RoutesPending")  # no endpoint yet
    service = next(o for o in objects if describe(o) == "Service/iris")
    slices = [endpoint_slice(service, {"router-a": True, "router-b": True, "router-c": False})]
    (ready, planned) = ready_reason(md, objects, slices)
    assert ready == ("False", "RoutesPending")
    version = next(o for o in planned.apply if o["kind"] == "RouteTable")["spec"]["routes"][
        "version"
    ]
    # One router still serves an older version: not Ready, and the message says which.
    acked(objects, {"router-a": version, "router-b": "old"})
    (ready, planned) = ready_reason(md, objects, slices)
    assert ready == ("False", "RoutesPending")
    message = next(c for c in planned.status["conditions"] if c["type"] == "Ready")["message"]
    assert "router-b" in message and "router-a" not in message
    # Every ready endpoint acked the current version (the not-ready one does not count).
    acked(objects, {"router-a": version, "router-b": version})
    assert ready_reason(md, objects, slices)[0] == ("True", "AllVariantsReady")
    # Slices of a Service that was since recreated do not count.
    stale = endpoint_slice({**service, "metadata": {**service["metadata"], "uid": "gone"}}, {})
    stale["endpoints"] = slices[0]["endpoints"]
    assert ready_reason(md, objects, [stale])[0] == ("False", "RoutesPending")


def test_acks_of_pods_that_are_no_endpoint_are_pruned() -> None:
    md = model_deployment()
    objects = children(md, {"iris-v1": 1})
    router_ready(objects)
    service = next(o for o in objects if describe(o) == "Service/iris")
    acked(objects, {"router-a": "v", "router-gone": "v", "router-starting": "v"})
    # No slice of the current Service yet (just recreated?): nothing is decided.
    assert ready_reason(md, objects)[1].prune_acks == ()
    slices = [endpoint_slice(service, {"router-a": True, "router-starting": False})]
    assert ready_reason(md, objects, slices)[1].prune_acks == ("router-gone",)


def gateway_route(md: dict[str, Any], generation: int, parents: list[Any]) -> dict[str, Any]:
    route = next(
        stored(o)
        for o in render_objects(parse_model_deployment(md), server_image=IMAGE)
        if o["kind"] == "HTTPRoute"
    )
    route["metadata"]["generation"] = generation
    if parents:
        route["status"] = {"parents": parents}
    return route


def parent(accepted: str, resolved: str, generation: int = 2) -> dict[str, Any]:
    def condition(type_: str, status: str) -> dict[str, Any]:
        return {
            "type": type_,
            "status": status,
            "reason": type_ if status == "True" else "NotAllowedByListeners",
            "message": "" if status == "True" else "no listener matches",
            "observedGeneration": generation,
        }

    return {
        "parentRef": {"name": "gw", "namespace": "infra"},
        "controllerName": "example.net/gateway",
        "conditions": [condition("Accepted", accepted), condition("ResolvedRefs", resolved)],
    }


@pytest.mark.parametrize(
    ("parents", "expected"),
    [
        ([], ("False", "NoGatewayAccepted")),
        ([parent("False", "True")], ("False", "GatewayNotAccepted")),
        ([parent("True", "False")], ("False", "RefsUnresolved")),
        ([parent("True", "True", generation=1)], ("False", "GatewayPending")),
        ([parent("True", "True"), parent("False", "True")], ("False", "GatewayNotAccepted")),
        ([parent("True", "True")], ("True", "AllVariantsReady")),
    ],
    ids=["no parent", "refused", "refs", "stale", "one of two refused", "accepted"],
)
def test_gateway_mode_ready_reflects_the_parents_conditions(
    parents: list[Any], expected: tuple[str, str]
) -> None:
    md = model_deployment(routing=GATEWAY)
    objects = [o for o in children(md, {"iris-v1": 1, "iris-v2": 1}) if o["kind"] != "HTTPRoute"]
    objects.append(gateway_route(md, 2, parents))
    (ready, planned) = ready_reason(md, objects)
    assert ready == expected
    if expected[1] == "GatewayNotAccepted":
        message = next(c for c in planned.status["conditions"] if c["type"] == "Ready")["message"]
        assert "infra/gw" in message and "no listener matches" in message


def test_a_router_ack_is_news_for_the_plan() -> None:
    md = model_deployment()
    route_table = next(o for o in children(md) if o["kind"] == "RouteTable")
    with_ack = copy.deepcopy(route_table)
    with_ack["status"] = {"acks": {"router-a": "abc"}}
    assert plan_inputs("RouteTable", None) == plan_inputs("RouteTable", route_table)
    assert plan_inputs("RouteTable", with_ack) != plan_inputs("RouteTable", route_table)


def applied(planned: Plan) -> list[dict[str, Any]]:
    """The children as the API server holds them once `planned` was applied (with defaults)."""
    objects = [stored(o) for o in planned.desired]
    for obj in objects:
        obj["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"
    return objects


def applied_identity(planned: Plan) -> tuple[dict[str, Any], ...]:
    """The namespace's router identity as the API server holds it once `planned` was applied."""
    return tuple(stored(o) for o in planned.apply if o["kind"] in ("ServiceAccount", "RoleBinding"))


def test_an_unchanged_model_deployment_applies_nothing() -> None:
    md = model_deployment()
    first = plan(Snapshot(md), server_image=IMAGE, now=T0)
    observed = Snapshot(md, applied(first), router_identity=applied_identity(first))
    again = plan(observed, server_image=IMAGE, now=T1)
    assert len(again.desired) == len(first.apply) - 2 == 8
    assert again.apply == () and again.recreate == () and again.prune == ()


def test_the_router_identity_is_the_namespace_s_repaired_by_any_of_its_model_deployments() -> None:
    md = model_deployment()
    first = plan(Snapshot(md), server_image=IMAGE, now=T0)
    account, binding = applied_identity(first)
    assert identity_intact(account) and identity_intact(binding)
    # Another ModelDeployment of the namespace finds it in place and writes nothing for it.
    other = model_deployment(name="other")
    assert [describe(o) for o in plan(Snapshot(other), server_image=IMAGE, now=T0).apply][:2] == [
        "ServiceAccount/modeldeploy-router",
        "RoleBinding/modeldeploy-router",
    ]
    planned = plan(Snapshot(other, router_identity=(account, binding)), server_image=IMAGE, now=T0)
    assert not any(o["kind"] in ("ServiceAccount", "RoleBinding") for o in planned.apply)
    assert planned.prune == ()
    # A hand edit of its roleRef (immutable) is drift: delete and create it again.
    edited = copy.deepcopy(binding)
    edited["roleRef"]["name"] = "admin"
    assert not identity_intact(edited)
    planned = plan(Snapshot(other, router_identity=(account, edited)), server_image=IMAGE, now=T1)
    assert [describe(r.observed) for r in planned.recreate] == ["RoleBinding/modeldeploy-router"]
    assert [describe(o) for o in planned.apply][:1] == ["RoleBinding/modeldeploy-router"]
    # Without a router there is no identity to keep.
    gateway = plan(Snapshot(model_deployment(routing=GATEWAY)), server_image=IMAGE, now=T0)
    assert not any(o["kind"] in ("ServiceAccount", "RoleBinding") for o in gateway.apply)


def test_a_hand_edited_or_stripped_child_is_applied_again_and_only_it() -> None:
    md = model_deployment()
    observed = applied(plan(Snapshot(md), server_image=IMAGE, now=T0))
    deployment = next(o for o in observed if describe(o) == "Deployment/iris-v1")
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    route_table = next(o for o in observed if describe(o) == "RouteTable/iris-routes")
    del route_table["spec"]["routes"]["variants"]  # a field we set, removed by hand
    planned = plan(Snapshot(md, observed), server_image=IMAGE, now=T1)
    assert [
        describe(o) for o in planned.apply if o["kind"] not in ("ServiceAccount", "RoleBinding")
    ] == [
        "Deployment/iris-v1",
        "RouteTable/iris-routes",
    ]


def test_a_new_spec_applies_what_it_changes_and_what_no_longer_sets_a_field() -> None:
    md = model_deployment()
    first = plan(Snapshot(md), server_image=IMAGE, now=T0)
    observed = applied(first)
    for obj in observed:
        # Without the hash that says what was applied last, nothing proves a field we stopped
        # setting is gone (server-side apply removes such fields): apply again.
        if describe(obj) == "Service/iris":
            del obj["metadata"]["annotations"][naming.APPLIED_HASH]
    changed = model_deployment(variants=[variant("v1", 50), variant("v2", 50)])
    identity = applied_identity(first)
    planned = plan(
        Snapshot(changed, observed, router_identity=identity), server_image=IMAGE, now=T1
    )
    new = {describe(o) for o in planned.desired} - {describe(o) for o in first.desired}
    different = {describe(o) for o in planned.desired if o not in first.desired} - new
    assert different  # the weights show on some children
    assert "Service/iris" not in different
    assert {describe(o) for o in planned.apply} == different | {"Service/iris"}
