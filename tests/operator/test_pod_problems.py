"""Why a variant's pods do not run, as the kubelet reports it, and how the status says so."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson

from modeldeploy_operator import naming
from modeldeploy_operator.informer import trim
from modeldeploy_operator.plan import Snapshot, plan, pods_worth_reading
from modeldeploy_operator.pod_problems import (
    MESSAGE_LIMIT,
    pod_problem,
    rollout_incomplete,
    variant_pod_problems,
)
from tests.operator.builders import model_deployment, variant

# A variant pod of examples/iris.yaml as the real-cluster suite's kubelet (1.35.4) reports it
# (`kubectl get -o json`: without managedFields, which the operator never keeps either).
RUNNING_POD = json.loads(
    (Path(__file__).parent / "golden" / "variant_pod_running.json").read_text()
)
SHA_MISMATCH = (
    "modeldeploy-server fetch: error: sha256 mismatch for /model-source/iris-v2.onnx: "
    "expected 1111, got 2222"
)


def pod(
    name: str,
    variant_name: str = "v2",
    *,
    init: list[dict[str, Any]] | None = None,
    containers: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {**naming.variant_labels("iris", variant_name, "ab" * 32)},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T10:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "status": {
            "conditions": conditions or [],
            "initContainerStatuses": init or [],
            "containerStatuses": containers or [],
        },
    }


def fetch_failed(restarts: int = 2, message: str = SHA_MISMATCH) -> dict[str, Any]:
    """The fetch init container in back-off after exiting 1, as the kubelet reports it."""
    return {
        "name": "fetch-model",
        "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}},
    }


def test_a_fetch_refusing_the_model_names_the_sha256_mismatch() -> None:
    said = pod_problem(pod("iris-v2-a", init=[fetch_failed()]))
    assert said == f"init container fetch-model failed (exit 1, 2 restarts): {SHA_MISMATCH}"


def test_a_container_that_just_exited_is_reported_before_its_back_off() -> None:
    init = [{"name": "fetch-model", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}]
    assert pod_problem(pod("p", init=init)) == "init container fetch-model failed (exit 2): Error"


def test_image_pull_errors_and_unschedulable_pods_are_problems() -> None:
    waiting = {"reason": "ImagePullBackOff", "message": 'pull "x:1": not found'}
    pulling = pod("p", containers=[{"name": "server", "state": {"waiting": waiting}}])
    assert pod_problem(pulling) == 'container server ImagePullBackOff: pull "x:1": not found'
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient memory.",
    }
    said = pod_problem(pod("p", conditions=[unschedulable]))
    assert said == "cannot be scheduled: 0/1 nodes are available: 1 Insufficient memory."


def test_healthy_and_starting_pods_have_no_problem() -> None:
    starting = pod(
        "p",
        init=[{"name": "fetch-model", "state": {"running": {}}}],
        containers=[{"name": "server", "state": {"waiting": {"reason": "PodInitializing"}}}],
    )
    recovered = pod(
        "p",
        init=[{"name": "fetch-model", "state": {"terminated": {"exitCode": 0}}}],
        containers=[
            {
                "name": "server",
                "restartCount": 1,
                "state": {"running": {}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            }
        ],
    )
    assert pod_problem(starting) == ""
    assert pod_problem(recovered) == ""
    assert pod_problem({}) == ""


def test_long_messages_are_clipped() -> None:
    said = pod_problem(pod("p", init=[fetch_failed(message="x" * 5000)]))
    assert len(said) == MESSAGE_LIMIT and said.endswith("...")


def test_one_problem_per_variant_from_its_first_failing_pod_ignoring_deleted_ones() -> None:
    pods = [
        pod("iris-v2-b", init=[fetch_failed(message="second")]),
        pod("iris-v2-a", init=[fetch_failed(message="first")]),
        pod("iris-v1-a", "v1", init=[fetch_failed(message="gone")], deleting=True),
        pod("iris-v1-b", "v1"),
    ]
    problems = variant_pod_problems(pods)
    assert set(problems) == {"v2"}
    assert problems["v2"].startswith("pod iris-v2-a: init container fetch-model failed")
    assert problems["v2"].endswith(": first")


def deployment(**status: int) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {
            "name": "iris-v2",
            "generation": 2,
            "labels": naming.variant_labels("iris", "v2", "ab" * 32),
        },
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 2, **status},
    }


def test_pods_are_read_only_while_a_variant_is_not_fully_rolled_out() -> None:
    done = deployment(replicas=2, updatedReplicas=2, availableReplicas=2, readyReplicas=2)
    assert not rollout_incomplete(done)
    assert rollout_incomplete(deployment(replicas=3, updatedReplicas=1, availableReplicas=2))
    assert rollout_incomplete(deployment(updatedReplicas=2, availableReplicas=2) | {"status": {}})
    assert rollout_incomplete(
        deployment(updatedReplicas=2, availableReplicas=1, unavailableReplicas=1)
    )
    router = {**done, "metadata": {**done["metadata"], "labels": naming.router_selector("iris")}}
    assert not pods_worth_reading([done])
    assert pods_worth_reading([done, deployment(updatedReplicas=1)])
    # Only variant Deployments: a router rolling out has no model to refuse.
    router_rolling = {**router, "status": {"observedGeneration": 1}}
    assert not pods_worth_reading([router_rolling])


def test_the_plan_says_why_a_variant_does_not_roll_out() -> None:
    md = model_deployment(variants=[variant("v1", 100), variant("v2", 0)])
    md["metadata"]["uid"] = "uid-1"
    failing = plan(
        Snapshot(md, pods=[pod("iris-v2-a", init=[fetch_failed()])]),
        server_image="img",
        now="2026-12-01T10:00:00Z",
    )
    degraded = next(c for c in failing.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PodsFailing")
    assert degraded["message"] == (
        "v2: pod iris-v2-a: init container fetch-model failed (exit 1, 2 restarts): " + SHA_MISMATCH
    )
    assert any(e.reason == "PodsFailing" and e.type == "Warning" for e in failing.events)
    healthy = plan(Snapshot(md, pods=[pod("iris-v2-a")]), server_image="img", now="t")
    degraded = next(c for c in healthy.status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"


def test_the_operator_keeps_a_fifth_of_a_pod_and_all_it_reads_of_one() -> None:
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    pulling = {"name": "server", "state": {"waiting": {"reason": "ErrImagePull", "message": "no"}}}
    failing = []
    for key, status in (
        ("initContainerStatuses", fetch_failed()),
        ("containerStatuses", pulling),
        ("conditions", {**unschedulable, "message": "0/1 nodes are available"}),
    ):
        broken = copy.deepcopy(RUNNING_POD)
        broken["status"][key] = [*broken["status"][key], status]
        failing.append(broken)
    deleting = copy.deepcopy(failing[0])
    deleting["metadata"]["deletionTimestamp"] = "2026-12-03T08:30:00Z"
    for full in (RUNNING_POD, *failing, deleting):
        kept = trim(full, "Pod")
        assert "spec" not in kept
        assert pod_problem(kept) == pod_problem(full)
        assert variant_pod_problems([kept]) == variant_pod_problems([full])
        for field in ("name", "uid", "resourceVersion", "labels"):  # what the index reads
            assert kept["metadata"][field] == full["metadata"][field]
    assert pod_problem(RUNNING_POD) == ""
    assert [pod_problem(p).split(" ")[:2] for p in failing] == [
        ["init", "container"],
        ["container", "server"],
        ["cannot", "be"],
    ]
    assert variant_pod_problems([trim(deleting, "Pod")]) == {}
    assert len(orjson.dumps(trim(RUNNING_POD, "Pod"))) * 5 < len(orjson.dumps(RUNNING_POD))
    # The other kinds lose only their managedFields: the operator compares them with what it
    # applied.
    deployment = {"kind": "Deployment", "metadata": {"name": "d", "managedFields": [{}]}, "x": 1}
    assert trim(deployment, "Deployment") == {
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "x": 1,
    }
