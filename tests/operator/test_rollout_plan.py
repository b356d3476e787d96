"""The rollout inside the operator's pure plan: routes carry the rollout's weights (the spec's stay
the destination), status.rollout, one event per decision, Degraded after a rollback, the requeue,
commands by annotation; and the metrics window the operator reads for it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from modeldeploy_operator.gate_jobs import gate_labels
from modeldeploy_operator.informer import trim
from modeldeploy_operator.plan import Plan, Snapshot, plan
from modeldeploy_operator.reconcile import observe_metrics
from modeldeploy_operator.rollout import VariantMetrics
from modeldeploy_operator.rollout_control import (
    COMMAND_ANNOTATION,
    parse_command,
    router_metrics_urls,
    window_query,
)
from modeldeploy_operator.rollout_sources import DirectMetrics
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_server.router import RouterMetrics
from tests.operator.builders import SHA_V2, model_deployment
from tests.operator.test_plan import IMAGE, children, conditions, routed_weights

T0 = "2026-12-01T12:00:00Z"
STEPS = [{"percent": 10, "holdSeconds": 60}, {"percent": 50, "holdSeconds": 60}]
ROLLOUT = {
    "steps": STEPS,
    "analysis": {"errorRate": {"max": 0.05}, "p99LatencyMs": {"maxRatioToStable": 2}},
    "minSamples": 20,
    "intervalSeconds": 10,
}
GOOD = {
    "v1": VariantMetrics(requests=200, errors=0, p99_latency_ms=10.0),
    "v2": VariantMetrics(requests=40, errors=0, p99_latency_ms=12.0),
}
FAILING = {
    "v1": VariantMetrics(requests=200, errors=0, p99_latency_ms=10.0),
    "v2": VariantMetrics(requests=40, errors=20, p99_latency_ms=12.0),
}
READY = {"iris-v1": 1, "iris-v2": 1}


def at(seconds: int) -> str:
    return f"2026-12-01T12:{seconds // 60:02d}:{seconds % 60:02d}Z"


def md(v1: int, v2: int, generation: int, **extra: Any) -> dict[str, Any]:
    obj = model_deployment(generation=generation)
    obj["spec"]["variants"][0]["weight"] = v1
    obj["spec"]["variants"][1]["weight"] = v2
    obj["spec"]["rollout"] = copy.deepcopy(ROLLOUT)
    for key, value in extra.items():
        obj["metadata" if key == "annotations" else "spec"][key] = value
    return obj


def step(
    obj: dict[str, Any],
    previous: dict[str, Any] | None,
    now: str,
    metrics: dict[str, VariantMetrics] | None = None,
    gate_pods: tuple[dict[str, Any], ...] = (),
) -> Plan:
    obj = copy.deepcopy(obj)
    if previous is not None:
        obj["status"] = previous
    snapshot = Snapshot(obj, children(obj, READY), metrics=metrics or {}, gate_pods=gate_pods)
    return plan(snapshot, server_image=IMAGE, now=now)


def promoted_v1() -> dict[str, Any]:
    """The status of generation 1 (v1=100) once promoted: what flows when generation 2 comes."""
    first = step(md(100, 0, 1), None, T0)
    assert first.status["rollout"]["phase"] == "Promoted"
    return first.status


def rows(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """variant -> (spec weight, effective weight) from the status rows."""
    return {r["name"]: (r["weight"], r["effectiveWeight"]) for r in status["variants"]}


def test_first_generation_without_gates_is_promoted_at_once() -> None:
    planned = step(md(90, 10, 1), None, T0)
    rollout = planned.status["rollout"]
    assert (rollout["phase"], rollout["weights"]) == ("Promoted", {"v1": 90, "v2": 10})
    assert routed_weights(planned.apply) == {"v1": 90, "v2": 10}
    assert planned.requeue_after_s is None
    assert [e.reason for e in planned.events if e.reason.startswith("Rollout")] == [
        "RolloutStarted",
        "RolloutPromoted",
    ]


def test_a_good_candidate_walks_every_step_and_is_promoted() -> None:
    spec = md(0, 100, 2)
    start = step(spec, promoted_v1(), at(0))
    # The routes carry the first step's weights; the spec's stay as written.
    assert routed_weights(start.apply) == {"v1": 90, "v2": 10}
    assert rows(start.status) == {"v1": (0, 90), "v2": (100, 10)}
    assert start.status["rollout"]["phase"] == "Progressing"
    assert start.status["rollout"]["stableWeights"] == {"v1": 100, "v2": 0}
    assert start.requeue_after_s == 10.0
    assert conditions(start.status)["Degraded"] == ("False", "AsExpected")

    # Within the hold nothing moves, and looking again changes nothing.
    holding = step(spec, start.status, at(30), GOOD)
    assert holding.status == start.status and not holding.events
    assert holding.requeue_after_s == 10.0

    second = step(spec, start.status, at(61), GOOD)
    assert routed_weights(second.apply) == {"v1": 50, "v2": 50}
    assert [e.reason for e in second.events if e.reason.startswith("Rollout")] == [
        "RolloutStepPassed",
        "RolloutStepStarted",
    ]
    done = step(spec, second.status, at(122), GOOD)
    assert routed_weights(done.apply) == {"v1": 0, "v2": 100}
    assert done.status["rollout"]["phase"] == "Promoted"
    assert done.status["rollout"]["stableWeights"] == {"v1": 0, "v2": 100}
    assert done.requeue_after_s is None
    passed = [d for d in done.status["rollout"]["history"] if d["action"] == "StepPassed"]
    assert [d["numbers"]["v2"]["requests"] for d in passed] == [40, 40]


def test_a_failing_candidate_is_rolled_back_with_the_numbers() -> None:
    spec = md(0, 100, 2)
    start = step(spec, promoted_v1(), at(0))
    failed = step(spec, start.status, at(20), FAILING)
    assert routed_weights(failed.apply) == {"v1": 100, "v2": 0}
    rollout = failed.status["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("RolledBack", "RolledBack")
    status, reason = conditions(failed.status)["Degraded"]
    assert (status, reason) == ("True", "RolledBack")
    degraded = next(c for c in failed.status["conditions"] if c["type"] == "Degraded")
    assert "error rate 0.5 > 0.05" in degraded["message"]
    assert "v2: requests=40, errors=20, errorRate=0.5" in degraded["message"]
    warnings = [e for e in failed.events if e.type == "Warning"]
    assert {e.reason for e in warnings} >= {"RolloutRolledBack", "RolledBack"}
    # It stays rolled back (and says so) until the spec changes.
    later = step(spec, failed.status, at(600), GOOD)
    assert later.status == failed.status and not later.events
    assert routed_weights(later.apply) == {"v1": 100, "v2": 0}
    # A new generation starts from the traffic flowing: the stable weights.
    again = step(md(0, 100, 3), failed.status, at(700))
    assert again.status["rollout"]["stableWeights"] == {"v1": 100, "v2": 0}
    assert routed_weights(again.apply) == {"v1": 90, "v2": 10}
    assert conditions(again.status)["Degraded"] == ("False", "AsExpected")


def test_reapplying_the_same_spec_mid_rollout_changes_nothing() -> None:
    spec = md(0, 100, 2)
    start = step(spec, promoted_v1(), at(0))
    second = step(spec, start.status, at(61), GOOD)
    # Same generation: the same step, the same weights, no event.
    again = step(spec, second.status, at(62), GOOD)
    assert again.status == second.status and not again.events
    assert routed_weights(again.apply) == routed_weights(second.apply)


def test_commands_by_annotation_are_handled_once_and_acknowledged() -> None:
    start = step(md(0, 100, 2), promoted_v1(), at(0))
    paused_spec = md(0, 100, 2, annotations={COMMAND_ANNOTATION: "pause@1"})
    paused = step(paused_spec, start.status, at(5), GOOD)
    assert paused.status["rollout"]["phase"] == "Paused"
    assert paused.status["rollout"]["command"] == "pause@1"
    assert paused.requeue_after_s is None
    # Seen again (the annotation stays): nothing new, even past the step's hold.
    assert step(paused_spec, paused.status, at(200), GOOD).status == paused.status
    resumed = step(
        md(0, 100, 2, annotations={COMMAND_ANNOTATION: "resume@2"}), paused.status, at(210), GOOD
    )
    assert resumed.status["rollout"]["phase"] == "Progressing"
    assert resumed.status["rollout"]["stepStartedAt"] == at(210)
    promoted = step(
        md(0, 100, 2, annotations={COMMAND_ANNOTATION: "promote"}), resumed.status, at(215)
    )
    assert promoted.status["rollout"]["phase"] == "Promoted"
    assert routed_weights(promoted.apply) == {"v1": 0, "v2": 100}


def test_abort_returns_to_the_stable_weights() -> None:
    start = step(md(0, 100, 2), promoted_v1(), at(0))
    aborted = step(
        md(0, 100, 2, annotations={COMMAND_ANNOTATION: "abort@x"}), start.status, at(5), GOOD
    )
    assert aborted.status["rollout"]["phase"] == "RolledBack"
    assert routed_weights(aborted.apply) == {"v1": 100, "v2": 0}
    assert conditions(aborted.status)["Degraded"] == ("True", "RolledBack")


def test_an_unknown_command_is_reported_once() -> None:
    start = step(md(0, 100, 2), promoted_v1(), at(0))
    spec = md(0, 100, 2, annotations={COMMAND_ANNOTATION: "jump"})
    told = step(spec, start.status, at(5))
    assert [e.reason for e in told.events] == ["UnknownCommand"]
    assert told.status["rollout"]["phase"] == "Progressing"
    assert not step(spec, told.status, at(6)).events


@pytest.mark.parametrize(
    ("value", "command"),
    [("pause", "pause"), ("Resume@2026", "resume"), ("promote@", "promote"), ("stop", None)],
)
def test_parse_command(value: str, command: str | None) -> None:
    assert parse_command(value) == command


def gate_pod(sha256: str, exit_code: int, message: str) -> dict[str, Any]:
    """A gate Job's pod as the kubelet leaves it: terminated, its verdict in the message."""
    terminated = {"exitCode": exit_code, "message": message}
    return {
        "metadata": {"name": "p", "labels": gate_labels("iris", "v2", sha256)},
        "status": {"containerStatuses": [{"name": "gate", "state": {"terminated": terminated}}]},
    }


PASSED = json.dumps({"passed": True, "rows": 150, "agreed": 150, "minAgreement": 1.0})
FAILED = json.dumps({"passed": False, "rows": 150, "agreed": 98, "minAgreement": 0.9})


def test_a_gated_candidate_gets_no_weight_until_its_gate_passed_for_its_digest() -> None:
    gate = {"dataset": {"uri": "https://data.example/golden.csv", "sha256": "c" * 64}}
    spec = md(0, 100, 2)
    spec["spec"]["variants"][1]["gate"] = gate
    gating = step(spec, promoted_v1(), at(0))
    assert gating.status["rollout"]["phase"] == "Gating"
    assert gating.status["rollout"]["pendingGates"] == ["v2"]
    assert routed_weights(gating.apply) == {"v1": 100, "v2": 0}
    # The gate runs as a Job named after the digest, against the variant's Service.
    (job,) = [o for o in gating.desired if o["kind"] == "Job"]
    assert job["metadata"]["name"] == f"iris-v2-gate-{SHA_V2[:10]}"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--url") + 1] == "http://iris-v2.ml.svc:8080"
    assert args[args.index("--model-sha256") + 1] == SHA_V2
    # A verdict for another digest, or an error (exit 2), is no verdict.
    for pod in (gate_pod("d" * 64, 0, PASSED), gate_pod(SHA_V2, 2, '{"error": "unreachable"}')):
        assert step(spec, gating.status, at(10), gate_pods=(pod,)).status == gating.status
    passed = step(spec, gating.status, at(20), gate_pods=(gate_pod(SHA_V2, 0, PASSED),))
    assert routed_weights(passed.apply) == {"v1": 90, "v2": 10}
    # The verdict is in what the operator keeps of a watched pod.
    kept = trim(gate_pod(SHA_V2, 0, PASSED), "Pod")
    assert step(spec, gating.status, at(20), gate_pods=(kept,)).status == passed.status
    failed = step(spec, gating.status, at(20), gate_pods=(gate_pod(SHA_V2, 1, FAILED),))
    assert failed.status["rollout"]["phase"] == "RolledBack"
    assert "98/150 rows agree" in failed.status["rollout"]["message"]
    assert routed_weights(failed.apply) == {"v1": 100, "v2": 0}


def test_a_gate_job_that_failed_without_a_verdict_fails_the_gate() -> None:
    spec = md(0, 100, 2)
    spec["spec"]["variants"][1]["gate"] = {
        "dataset": {"uri": "https://data.example/golden.csv", "sha256": "c" * 64}
    }
    gating = step(spec, promoted_v1(), at(0))
    (job,) = [o for o in gating.desired if o["kind"] == "Job"]
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
    job = {**job, "metadata": {**job["metadata"], "uid": "j"}, "status": {"conditions": [failed]}}
    obj = copy.deepcopy(spec)
    obj["status"] = gating.status
    planned = plan(
        Snapshot(obj, [*children(obj, READY), job], gate_pods=()), server_image=IMAGE, now=at(30)
    )
    rollout = planned.status["rollout"]
    assert (rollout["phase"], rollout["reason"]) == ("RolledBack", "GateFailed")
    assert "failed without a verdict: BackoffLimitExceeded" in rollout["message"]


def test_without_rollout_nothing_changes() -> None:
    planned = step(model_deployment(), None, T0)
    assert "rollout" not in planned.status and planned.requeue_after_s is None


SLICE = {
    "ports": [{"name": "http", "port": 8080}],
    "endpoints": [
        {"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
        {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
        {"addresses": ["fd00::3"]},
    ],
}


def test_the_metrics_window_is_the_steps_and_the_routers_are_the_ready_endpoints() -> None:
    assert router_metrics_urls([SLICE]) == (
        "http://10.1.0.1:8080/metrics",
        "http://[fd00::3]:8080/metrics",
    )
    spec = md(0, 100, 2)
    start = step(spec, promoted_v1(), at(0))
    parsed = parse_model_deployment(spec)
    query = window_query(parsed, start.status, [SLICE], at(30))
    assert query is not None
    assert (query.since.isoformat(), query.now.isoformat()) == (
        "2026-12-01T12:00:00+00:00",
        "2026-12-01T12:00:30+00:00",
    )
    assert query.variants == ("v1", "v2") and len(query.targets) == 2
    # A new generation's window begins with this very read.
    fresh = window_query(parse_model_deployment(md(0, 100, 3)), start.status, [], at(40))
    assert fresh is not None and fresh.since == fresh.now
    # Nothing to read once promoted, nor without a rollout.
    done = step(spec, step(spec, start.status, at(61), GOOD).status, at(122), GOOD)
    assert window_query(parsed, done.status, [SLICE], at(130)) is None
    assert window_query(parse_model_deployment(model_deployment()), None, [SLICE], T0) is None


def test_a_restarted_operator_counts_the_window_from_the_baseline_kept_in_the_status() -> None:
    """The direct source, as the operator runs it (observe_metrics, then the pure plan), on the
    real router's /metrics text; the status goes through JSON as through the API server, and
    the restart is a fresh source that has read nothing yet."""
    router = RouterMetrics()
    slices = [
        {
            "metadata": {"name": "iris-abcde", "labels": {"kubernetes.io/service-name": "iris"}},
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": True}}],
        }
    ]

    def reconcile(source: DirectMetrics, status: dict[str, Any], now: str) -> dict[str, Any]:
        obj = md(0, 100, 2)
        obj["status"] = status
        snapshot = Snapshot(obj, children(obj, READY), endpoint_slices=slices)
        planned = plan(observe_metrics(snapshot, now, source), server_image=IMAGE, now=now)
        return dict(json.loads(json.dumps(planned.status)))

    def served(variant: str, count: int) -> None:
        for _ in range(count):
            router.observe(variant, 200, 0.004)

    served("v1", 500)  # before the rollout
    first = DirectMetrics(fetch=lambda _: router.render().decode())
    status = reconcile(first, promoted_v1(), T0)
    assert (status["rollout"]["phase"], status["rollout"]["stepStartedAt"]) == ("Progressing", T0)
    baseline = status["rollout"]["baseline"]
    assert baseline["at"] == T0
    assert baseline["routers"]["http://10.1.0.7:8080/metrics"]["v1"]["requests"] == 500
    served("v1", 150)
    served("v2", 30)
    status = reconcile(first, status, at(20))
    assert status["rollout"]["baseline"] == baseline  # the same window: the same baseline
    # The operator restarts: a fresh source; no request after it.
    status = reconcile(DirectMetrics(fetch=lambda _: router.render().decode()), status, at(60))
    decision = next(e for e in status["rollout"]["history"] if e["action"] == "StepPassed")
    assert decision["numbers"]["v2"]["requests"] == 30
    assert decision["numbers"]["stable"]["requests"] == 150
    # The next step's window begins now: its baseline is the read made now.
    assert status["rollout"]["baseline"]["at"] == at(60)
    assert (
        status["rollout"]["baseline"]["routers"]["http://10.1.0.7:8080/metrics"]["v2"]["requests"]
        == 30
    )


def test_no_baseline_is_kept_for_prometheus_or_outside_a_window() -> None:
    obj = md(0, 100, 2, rollout={**ROLLOUT, "analysis": {"prometheus": {"url": "http://p:9090"}}})
    progressing = step(obj, promoted_v1(), T0)
    assert progressing.status["rollout"]["phase"] == "Progressing"
    assert "baseline" not in progressing.status["rollout"]
    assert "baseline" not in promoted_v1()["rollout"]
