"""compute_status, compute_failed_status, compute_events: whole status, Kubernetes conventions."""

from __future__ import annotations

from typing import Any

import pytest

from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import ModelDeployment, parse_model_deployment
from modeldeploy_operator.status import (
    Event,
    compute_events,
    compute_failed_status,
    compute_status,
    ready_variants,
)
from modeldeploy_operator.traffic import compute_effective_weights
from tests.operator.builders import SHA_V1, SHA_V2, model_deployment, variant

T0 = "2026-11-21T09:00:00Z"
T1 = "2026-11-21T09:05:00Z"
IMAGE = "registry.example/modeldeploy-server:1.0"


def md(**kwargs: Any) -> ModelDeployment:
    return parse_model_deployment(model_deployment(**kwargs))


def deployment(
    name: str,
    *,
    replicas: int = 1,
    ready: int = 0,
    updated: int | None = None,
    generation: int = 1,
    observed: int = 1,
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A child Deployment as rendered, with a status as the Deployment controller would write it."""
    model = md(variants=[variant("v1", 50), variant("v2", 50)])
    rendered = next(
        o for o in render_objects(model, server_image=IMAGE) if o["metadata"]["name"] == name
    )
    rendered["metadata"]["generation"] = generation
    rendered["spec"]["replicas"] = replicas
    rendered["status"] = {
        "observedGeneration": observed,
        "replicas": replicas,
        "updatedReplicas": replicas if updated is None else updated,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "conditions": conditions or [],
    }
    return rendered


def status_of(
    model: ModelDeployment,
    children: dict[str, dict[str, Any]],
    *,
    previous: dict[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """compute_status with the traffic plan the operator derives from the same Deployments."""
    weights = compute_effective_weights(model.spec_weights, ready_variants(model, children))
    return compute_status(model, children, weights, previous=previous, now=now)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_nothing_created_yet() -> None:
    status = status_of(md(), {}, previous=None, now=T0)
    assert conditions(status) == {
        "Ready": ("False", "NoVariantReady"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "AsExpected"),
    }
    assert status["readyVariants"] == "0/2"
    assert status["traffic"] == "v1=0,v2=0"
    assert status["url"] == "http://iris.ml.svc"
    assert status["observedGeneration"] == 1
    assert [r["effectiveWeight"] for r in status["variants"]] == [0, 0]


def test_all_ready() -> None:
    children = {
        "iris-v1": deployment("iris-v1", ready=1),
        "iris-v2": deployment("iris-v2", ready=1),
    }
    status = status_of(md(generation=3), children, previous=None, now=T0)
    assert conditions(status) == {
        "Ready": ("True", "AllVariantsReady"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert status["variants"] == [
        {
            "name": "v1",
            "desiredReplicas": 1,
            "readyReplicas": 1,
            "weight": 90,
            "effectiveWeight": 90,
            "ready": True,
            "modelSha256": SHA_V1,
            "service": "iris-v1",
            "image": IMAGE,
        },
        {
            "name": "v2",
            "desiredReplicas": 1,
            "readyReplicas": 1,
            "weight": 10,
            "effectiveWeight": 10,
            "ready": True,
            "modelSha256": SHA_V2,
            "service": "iris-v2",
            "image": IMAGE,
        },
    ]
    assert (status["readyVariants"], status["traffic"]) == ("2/2", "v1=90,v2=10")


def test_not_ready_variant_gets_no_traffic_and_status_says_so() -> None:
    children = {"iris-v1": deployment("iris-v1", ready=1), "iris-v2": deployment("iris-v2")}
    status = status_of(md(), children, previous=None, now=T0)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "VariantsNotReady")
    assert "v2" in ready["message"] and "v1=100,v2=0" in ready["message"]
    assert [(r["ready"], r["effectiveWeight"]) for r in status["variants"]] == [
        (True, 100),
        (False, 0),
    ]
    assert status["readyVariants"] == "1/2"


def test_ready_but_still_rolling_out() -> None:
    children = {
        "iris-v1": deployment("iris-v1", replicas=3, ready=1, updated=1),
        "iris-v2": deployment("iris-v2", ready=1, generation=2, observed=1),
    }
    status = status_of(md(), children, previous=None, now=T0)
    assert conditions(status)["Ready"] == ("True", "AllVariantsReady")
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True"
    assert "v1: 1/3 ready" in progressing["message"]
    assert "v2: new spec not yet observed" in progressing["message"]


@pytest.mark.parametrize(
    "condition",
    [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet has timed out progressing.",
        },
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": "pods is forbidden: exceeded quota",
        },
    ],
    ids=["deadline", "replica failure"],
)
def test_failed_rollout_is_degraded(condition: dict[str, str]) -> None:
    children = {
        "iris-v1": deployment("iris-v1", ready=1),
        "iris-v2": deployment("iris-v2", conditions=[condition]),
    }
    status = status_of(md(), children, previous=None, now=T0)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "RolloutFailed"
    assert degraded["message"] == f"v2: {condition['message']}"


def test_autoscaled_variant_reports_the_replicas_the_hpa_chose() -> None:
    model = md(variants=[variant("v1", 100, autoscaling={"minReplicas": 2, "maxReplicas": 9})])
    assert status_of(model, {}, previous=None, now=T0)["variants"][0]["desiredReplicas"] == 2
    scaled = {"iris-v1": deployment("iris-v1", replicas=6, ready=6)}
    assert status_of(model, scaled, previous=None, now=T0)["variants"][0]["desiredReplicas"] == 6


def test_transition_time_moves_only_when_the_status_does() -> None:
    model = md()
    first = status_of(model, {}, previous=None, now=T0)
    unchanged = status_of(model, {}, previous=first, now=T1)
    assert unchanged == first  # so writing it again is a no-op
    children = {
        "iris-v1": deployment("iris-v1", ready=1),
        "iris-v2": deployment("iris-v2", ready=1),
    }
    after = status_of(model, children, previous=first, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in after["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}


def test_url_per_routing_mode() -> None:
    gateway = {
        "mode": "gateway",
        "gateway": {
            "parentRefs": [{"name": "gw"}],
            "hostnames": ["iris.example.com"],
            "pathPrefix": "/iris",
        },
    }
    assert status_of(md(routing=gateway), {}, previous=None, now=T0)["url"] == (
        "http://iris.example.com/iris"
    )
    assert status_of(md(routing={"mode": "none"}), {}, previous=None, now=T0)["url"] == ""


def test_ready_variants_needs_a_ready_replica() -> None:
    children = {
        "iris-v1": deployment("iris-v1", replicas=2, ready=1),
        "iris-v2": deployment("iris-v2"),
    }
    assert ready_variants(md(), children) == {"v1"}


def test_failed_status_is_degraded_and_keeps_transition_times() -> None:
    first = compute_failed_status(4, "InvalidSpec", "spec.variants: bad", previous=None, now=T0)
    assert first["observedGeneration"] == 4
    assert conditions(first) == {
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
    }
    again = compute_failed_status(4, "InvalidSpec", "spec.variants: bad", previous=first, now=T1)
    assert again == first
    assert "variants" not in first  # nothing was observed before, so nothing to keep


def test_failed_status_keeps_what_was_observed() -> None:
    children = {
        "iris-v1": deployment("iris-v1", ready=1),
        "iris-v2": deployment("iris-v2", ready=1),
    }
    ready = status_of(md(), children, previous=None, now=T0)
    failed = compute_failed_status(2, "InvalidSpec", "bad", previous=ready, now=T1)
    assert conditions(failed)["Degraded"] == ("True", "InvalidSpec")
    assert failed["observedGeneration"] == 2
    for field in ("url", "traffic", "readyVariants", "variants"):
        assert failed[field] == ready[field], field


def test_events_on_transitions_only() -> None:
    model = md()
    created = status_of(model, {}, previous=None, now=T0)
    assert compute_events(None, created) == []  # not ready yet is expected at first
    failed_at_once = compute_failed_status(1, "ApplyRejected", "refused", previous=None, now=T0)
    assert compute_events(None, failed_at_once) == [
        Event("Warning", "ApplyRejected", "Degraded=True: refused")
    ]
    assert compute_events(created, created) == []
    half = status_of(
        model,
        {"iris-v1": deployment("iris-v1", ready=1), "iris-v2": deployment("iris-v2")},
        previous=created,
        now=T1,
    )
    events = compute_events(created, half)
    # Ready stays False (only its reason changes): the traffic shift is the news.
    assert [e.reason for e in events] == ["TrafficShifted"]
    assert events[0].message == "traffic v1=0,v2=0 -> v1=100,v2=0"
    full = status_of(
        model,
        {"iris-v1": deployment("iris-v1", ready=1), "iris-v2": deployment("iris-v2", ready=1)},
        previous=half,
        now=T1,
    )
    assert [(e.type, e.reason) for e in compute_events(half, full)] == [
        ("Normal", "AllVariantsReady"),
        ("Normal", "RolloutComplete"),
        ("Normal", "TrafficShifted"),
    ]
    # One cause, one event: the conditions it turned are named together.
    failed = compute_failed_status(2, "InvalidSpec", "bad", previous=full, now=T1)
    assert compute_events(full, failed) == [
        Event("Warning", "InvalidSpec", "Ready=False, Degraded=True: bad")
    ]
    failed_midway = compute_failed_status(2, "InvalidSpec", "bad", previous=half, now=T1)
    assert compute_events(half, failed_midway) == [
        Event("Warning", "InvalidSpec", "Progressing=False, Degraded=True: bad")
    ]


def test_shadow_is_described_and_gateway_mode_says_nothing_is_compared() -> None:
    dark = [variant("v1", 100), variant("v2", 0)]
    shadow = {"variant": "v2", "percent": 10}
    router = status_of(md(variants=dark, routing={"shadow": shadow}), {}, previous=None, now=T0)
    assert router["shadow"] == (
        "v2 gets a copy of 10% of the weighted requests; the router compares its answers with "
        "the live variant's (metrics modeldeploy_router_shadow_*)"
    )
    gateway = {"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw"}]}, "shadow": shadow}
    status = status_of(md(variants=dark, routing=gateway), {}, previous=None, now=T0)
    assert "the Gateway discards its answers and makes no comparison" in status["shadow"]
    assert "shadow" not in status_of(md(), {}, previous=None, now=T0)


def test_old_pods_still_terminating_keep_the_rollout_in_progress() -> None:
    """They still answer over kept-alive connections: RolloutComplete only once they are gone."""
    terminating = deployment("iris-v2", ready=1)
    terminating["status"]["terminatingReplicas"] = 1
    children = {"iris-v1": deployment("iris-v1", ready=1), "iris-v2": terminating}
    status = status_of(md(), children, previous=None, now=T0)
    (progressing,) = [c for c in status["conditions"] if c["type"] == "Progressing"]
    assert (progressing["status"], progressing["reason"]) == ("True", "RollingOut")
    assert progressing["message"] == "v2: 1/1 ready, 1 terminating"
    assert conditions(status)["Ready"] == ("True", "AllVariantsReady")
