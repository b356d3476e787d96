"""plan_rollout, table-driven: every phase transition from (target, previous state, traffic flowing,
metrics over the step's window, gate verdicts, a command, the clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeldeploy_operator.rollout import (
    HISTORY_LIMIT,
    PHASES,
    Command,
    GateVerdict,
    ProbeRun,
    RolloutPlan,
    RolloutState,
    Target,
    VariantMetrics,
    interpolate,
    parse_rollout_status,
    plan_rollout,
    timestamp,
)
from modeldeploy_operator.spec import (
    Analysis,
    Bound,
    Probes,
    Rollout,
    RolloutStep,
    ShadowStep,
)

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
OLD, NEW = "a" * 64, "b" * 64
TARGET = Target(2, (("v1", 0), ("v2", 100)), {"v1": OLD, "v2": NEW}, gated={"v2"})
UNGATED = replace(TARGET, gated=())
ROLLOUT = Rollout(
    steps=(RolloutStep(10, 60), RolloutStep(50, 120)),
    analysis=Analysis(
        error_rate=Bound(max=0.05),
        p99_latency_ms=Bound(max_ratio_to_stable=2.0),
        shadow_disagreement=Bound(max=0.1),
    ),
    min_samples=100,
)
FLOW = {"v1": 100, "v2": 0}
GOOD = {
    "v1": VariantMetrics(requests=900, errors=9, p99_latency_ms=20.0),
    "v2": VariantMetrics(requests=100, errors=1, p99_latency_ms=25.0),
}
PASSED = {"v2": GateVerdict(NEW, True, "gate passed: 150/150")}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def state(phase: Any, step: int, weights: dict[str, int], **changes: Any) -> RolloutState:
    """A previous state of generation 2 that began at T0 from v1=100, its step begun at T0."""
    base = RolloutState(
        generation=2,
        phase=phase,
        step=step,
        weights=tuple(weights.items()),
        stable_weights=(("v1", 100), ("v2", 0)),
        started_at=timestamp(T0),
        step_started_at=timestamp(T0),
        reason="",
        message="",
    )
    return replace(base, **changes)


def plan(
    previous: RolloutState | None = None,
    *,
    target: Target = TARGET,
    rollout: Rollout = ROLLOUT,
    flowing: dict[str, int] = FLOW,
    metrics: dict[str, VariantMetrics] | None = None,
    verdicts: dict[str, GateVerdict] | None = None,
    command: Command | None = None,
    now: float = 0,
) -> RolloutPlan:
    return plan_rollout(
        target, rollout, previous, flowing, metrics or {}, verdicts or {}, command, at(now)
    )


PROGRESS_10 = state("Progressing", 0, {"v1": 90, "v2": 10})
PROGRESS_50 = state("Progressing", 1, {"v1": 50, "v2": 50})
SLOW = {**GOOD, "v2": VariantMetrics(requests=100, errors=0, p99_latency_ms=45.0)}
FAILING = {**GOOD, "v2": VariantMetrics(requests=120, errors=12, p99_latency_ms=25.0)}
QUIET = {**GOOD, "v2": VariantMetrics(requests=40, errors=0, p99_latency_ms=25.0)}
DISAGREEING = {**GOOD, "v2": replace(GOOD["v2"], shadow_compared=200, shadow_disagreed=30)}
PROBED = replace(ROLLOUT, probes=Probes(requests_per_second=5))
SHADOWED = replace(ROLLOUT, shadow=ShadowStep(percent=100, hold_seconds=30))
SHADOWING = state("Shadowing", 0, FLOW)
MIRRORED_BAD = {"v2": VariantMetrics(shadow_compared=100, shadow_disagreed=35)}
MIRRORED_GOOD = {"v2": VariantMetrics(shadow_compared=100, shadow_disagreed=2)}
# v2's users are short; its probes (and the stable variant's) are plenty.
PROBE_GOOD = VariantMetrics(requests=100, errors=0, p99_latency_ms=20.0)
PROBE_BAD = VariantMetrics(requests=100, errors=40, p99_latency_ms=20.0)
PROBING_10 = replace(PROGRESS_10, probes_started_at=timestamp(at(10)))


def probed(v2_probes: VariantMetrics, v2_users: int = 5) -> dict[str, VariantMetrics]:
    """Users: plenty on v1, `v2_users` on v2; probes: 100 good ones on v1, `v2_probes` on v2."""
    return {
        "v1": replace(GOOD["v1"], probes=PROBE_GOOD),
        "v2": VariantMetrics(requests=v2_users, errors=0, p99_latency_ms=20.0, probes=v2_probes),
    }


# (id, previous, keyword inputs, expected phase, reason, step, weights)
CASES: list[tuple[str, RolloutState | None, dict[str, Any], str, str, int, dict[str, int]]] = [
    ("new generation waits for the gate", None, {}, "Gating", "Gating", 0, FLOW),
    (
        "a verdict for another digest does not count",
        None,
        {"verdicts": {"v2": GateVerdict(OLD, True)}},
        "Gating",
        "Gating",
        0,
        FLOW,
    ),
    (
        "a failed gate never gets weight",
        None,
        {"verdicts": {"v2": GateVerdict(NEW, False, "gate FAILED: 90/150")}},
        "RolledBack",
        "GateFailed",
        0,
        FLOW,
    ),
    (
        "a passed gate starts step 1",
        state("Gating", 0, FLOW),
        {"verdicts": PASSED, "now": 30},
        "Progressing",
        "GatesPassed",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "no gate: step 1 at once",
        None,
        {"target": UNGATED},
        "Progressing",
        "GatesPassed",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "within the hold, good metrics: nothing changes",
        PROGRESS_10,
        {"metrics": GOOD, "now": 59},
        "Progressing",
        "",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "hold over, good metrics: the next step",
        PROGRESS_10,
        {"metrics": GOOD, "now": 60},
        "Progressing",
        "StepStarted",
        1,
        {"v1": 50, "v2": 50},
    ),
    (
        "last step passed: promoted",
        PROGRESS_50,
        {"metrics": GOOD, "now": 120},
        "Promoted",
        "Promoted",
        2,
        {"v1": 0, "v2": 100},
    ),
    (
        "error rate over its bound: rolled back within the window",
        PROGRESS_10,
        {"metrics": FAILING, "now": 20},
        "RolledBack",
        "RolledBack",
        0,
        FLOW,
    ),
    (
        "p99 over twice the stable one: rolled back",
        PROGRESS_50,
        {"metrics": SLOW, "now": 5},
        "RolledBack",
        "RolledBack",
        1,
        FLOW,
    ),
    (
        "shadow disagreement over its bound: rolled back",
        PROGRESS_10,
        {"metrics": DISAGREEING, "now": 5},
        "RolledBack",
        "RolledBack",
        0,
        FLOW,
    ),
    (
        "bad but too few samples: not judged yet",
        PROGRESS_10,
        {"metrics": {**GOOD, "v2": VariantMetrics(requests=10, errors=10)}, "now": 20},
        "Progressing",
        "",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "hold over, too few samples: Inconclusive holds",
        PROGRESS_10,
        {"metrics": QUIET, "now": 60},
        "Inconclusive",
        "Inconclusive",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "silence is never a promotion by default",
        PROGRESS_50,
        {"metrics": {}, "now": 600},
        "Inconclusive",
        "Inconclusive",
        1,
        {"v1": 50, "v2": 50},
    ),
    (
        "Inconclusive, then enough samples: the next step",
        state("Inconclusive", 0, {"v1": 90, "v2": 10}),
        {"metrics": GOOD, "now": 60},
        "Progressing",
        "StepStarted",
        1,
        {"v1": 50, "v2": 50},
    ),
    (
        "low traffic, policy rollback",
        PROGRESS_10,
        {"metrics": QUIET, "now": 60, "rollout": replace(ROLLOUT, low_traffic="rollback")},
        "RolledBack",
        "Inconclusive",
        0,
        FLOW,
    ),
    (
        "low traffic, policy promote: the next step",
        PROGRESS_10,
        {"metrics": QUIET, "now": 60, "rollout": replace(ROLLOUT, low_traffic="promote")},
        "Progressing",
        "StepStarted",
        1,
        {"v1": 50, "v2": 50},
    ),
    (
        "pause freezes the weights",
        PROGRESS_10,
        {"command": "pause", "metrics": FAILING, "now": 20},
        "Paused",
        "Paused",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "paused: bad metrics and time change nothing",
        state("Paused", 0, {"v1": 90, "v2": 10}, paused_from="Progressing"),
        {"metrics": FAILING, "now": 9999},
        "Paused",
        "",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "resume restarts the step's window",
        state("Paused", 0, {"v1": 90, "v2": 10}, paused_from="Progressing"),
        {"command": "resume", "metrics": GOOD, "now": 9999},
        "Progressing",
        "Resumed",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "resume into gating",
        state("Paused", 0, FLOW, paused_from="Gating"),
        {"command": "resume", "verdicts": PASSED, "now": 10},
        "Progressing",
        "GatesPassed",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "promote now skips the rest",
        state("Gating", 0, FLOW),
        {"command": "promote"},
        "Promoted",
        "ManualPromote",
        2,
        {"v1": 0, "v2": 100},
    ),
    (
        "abort returns to the stable weights",
        PROGRESS_50,
        {"command": "abort", "metrics": GOOD, "now": 5},
        "RolledBack",
        "Aborted",
        1,
        FLOW,
    ),
    (
        "abort a paused rollout",
        state("Paused", 1, {"v1": 50, "v2": 50}, paused_from="Progressing"),
        {"command": "abort"},
        "RolledBack",
        "Aborted",
        1,
        FLOW,
    ),
    (
        "rolled back stays so until the spec changes",
        state("RolledBack", 0, FLOW, reason="RolledBack"),
        {"metrics": GOOD, "verdicts": PASSED, "command": "resume", "now": 999},
        "RolledBack",
        "RolledBack",
        0,
        FLOW,
    ),
    (
        "promoted stays so",
        state("Promoted", 2, {"v1": 0, "v2": 100}, reason="Promoted"),
        {"metrics": FAILING, "command": "abort", "now": 999},
        "Promoted",
        "Promoted",
        2,
        {"v1": 0, "v2": 100},
    ),
    (
        "deadline passed: rolled back",
        PROGRESS_10,
        {"metrics": GOOD, "now": 50, "rollout": replace(ROLLOUT, deadline_seconds=40)},
        "RolledBack",
        "DeadlineExceeded",
        0,
        FLOW,
    ),
    (
        "a new generation starts from the traffic flowing",
        state("RolledBack", 0, FLOW),
        {"target": replace(UNGATED, generation=3), "flowing": {"v1": 50, "v2": 50}},
        "Progressing",
        "GatesPassed",
        0,
        {"v1": 45, "v2": 55},
    ),
    (
        "the spec's weights already flow: promoted at once",
        None,
        {"flowing": {"v1": 0, "v2": 100}},
        "Promoted",
        "Promoted",
        2,
        {"v1": 0, "v2": 100},
    ),
    (
        "nothing flows yet (a new deployment), no gate: promoted at once",
        None,
        {"target": UNGATED, "flowing": {}},
        "Promoted",
        "Promoted",
        2,
        {"v1": 0, "v2": 100},
    ),
    (
        "nothing flows yet: a gated variant gets nothing until its gate passes",
        None,
        {"target": replace(TARGET, weights=(("v1", 50), ("v2", 50))), "flowing": {}},
        "Gating",
        "Gating",
        0,
        {"v1": 100, "v2": 0},
    ),
    (
        "a removed variant's share is spread over the others",
        None,
        {"target": UNGATED, "flowing": {"v0": 50, "v1": 50}},
        "Progressing",
        "GatesPassed",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "shadow step: gates passed, the candidate is mirrored with no weight",
        state("Gating", 0, FLOW),
        {"rollout": SHADOWED, "verdicts": PASSED, "now": 5},
        "Shadowing",
        "ShadowStarted",
        0,
        FLOW,
    ),
    (
        "shadow step: a disagreeing candidate is rolled back before any weight",
        SHADOWING,
        {"rollout": SHADOWED, "metrics": MIRRORED_BAD, "now": 10},
        "RolledBack",
        "RolledBack",
        0,
        FLOW,
    ),
    (
        "shadow step: disagreeing on too few comparisons is not judged yet",
        SHADOWING,
        {
            "rollout": SHADOWED,
            "metrics": {"v2": VariantMetrics(shadow_compared=10, shadow_disagreed=10)},
            "now": 10,
        },
        "Shadowing",
        "",
        0,
        FLOW,
    ),
    (
        "shadow step: agreeing when the hold is over, the first weighted step",
        SHADOWING,
        {"rollout": SHADOWED, "metrics": MIRRORED_GOOD, "now": 30},
        "Progressing",
        "StepStarted",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "shadow step: too few comparisons, Inconclusive holds and it stays mirrored",
        SHADOWING,
        {"rollout": SHADOWED, "metrics": {}, "now": 30},
        "Shadowing",
        "Inconclusive",
        0,
        FLOW,
    ),
    (
        "shadow step: skipped for a candidate that already has weight",
        replace(state("Gating", 0, {"v1": 90, "v2": 10}), stable_weights=(("v1", 90), ("v2", 10))),
        {"rollout": SHADOWED, "verdicts": PASSED, "now": 5},
        "Progressing",
        "GatesPassed",
        0,
        {"v1": 81, "v2": 19},
    ),
    (
        "probes: users behind the pace of minSamples start probe traffic",
        PROGRESS_10,
        {"rollout": PROBED, "metrics": QUIET, "now": 30},
        "Progressing",
        "ProbesStarted",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "probes: users on pace (40 of 100 after 20 of 60 s) start none",
        PROGRESS_10,
        {"rollout": PROBED, "metrics": QUIET, "now": 20},
        "Progressing",
        "",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "probes: none without spec.rollout.probes",
        PROGRESS_10,
        {"metrics": QUIET, "now": 30},
        "Progressing",
        "",
        0,
        {"v1": 90, "v2": 10},
    ),
    (
        "probes: good probe samples decide a step short of user samples",
        PROBING_10,
        {"rollout": PROBED, "metrics": probed(PROBE_GOOD), "now": 60},
        "Progressing",
        "StepStarted",
        1,
        {"v1": 50, "v2": 50},
    ),
    (
        "probes: failing probe samples roll back within the window",
        PROBING_10,
        {"rollout": PROBED, "metrics": probed(PROBE_BAD), "now": 30},
        "RolledBack",
        "RolledBack",
        0,
        FLOW,
    ),
    (
        "probes: enough user samples are judged on users alone (bad probes ignored)",
        PROBING_10,
        {"rollout": PROBED, "metrics": probed(PROBE_BAD, v2_users=100), "now": 60},
        "Progressing",
        "StepStarted",
        1,
        {"v1": 50, "v2": 50},
    ),
    (
        "probes: still short with probes, the window ends Inconclusive and holds",
        PROBING_10,
        {"rollout": PROBED, "metrics": probed(replace(PROBE_GOOD, requests=30)), "now": 60},
        "Inconclusive",
        "Inconclusive",
        0,
        {"v1": 90, "v2": 10},
    ),
]


@pytest.mark.parametrize(
    ("previous", "inputs", "phase", "reason", "step", "weights"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_transition(
    previous: RolloutState | None,
    inputs: dict[str, Any],
    phase: str,
    reason: str,
    step: int,
    weights: dict[str, int],
) -> None:
    result = plan(previous, **inputs).state
    assert (result.phase, result.reason, result.step) == (phase, reason, step), result.message
    assert dict(result.weights) == weights
    assert sum(weight for _, weight in result.weights) == 100
    # Every decision is recorded with the weights it left, and the state round-trips.
    assert parse_rollout_status(result.as_status()) == result


def test_every_phase_is_reached() -> None:
    reached = {case[3] for case in CASES}
    assert reached == set(PHASES)


def test_a_rollback_says_which_numbers_decided_it() -> None:
    result = plan(PROGRESS_10, metrics=FAILING, now=20)
    decision = result.decisions[-1]
    assert decision.action == "RolledBack"
    assert decision.message == "v2: error rate 0.1 > 0.05"
    assert decision.numbers["v2"]["errors"] == 12 and decision.numbers["v2"]["requests"] == 120
    assert decision.numbers["stable"]["errorRate"] == 0.01
    assert result.requeue_after_s is None  # only a spec change moves it now


def test_failure_limit_tolerates_failures_then_rolls_back() -> None:
    rollout = replace(ROLLOUT, failure_limit=1)
    first = plan(PROGRESS_10, rollout=rollout, metrics=FAILING, now=20).state
    assert (first.phase, first.reason, first.failures) == ("Progressing", "AnalysisFailed", 1)
    assert first.step_started_at == timestamp(at(20))  # a fresh window for fresh counts
    second = plan(first, rollout=rollout, metrics=FAILING, now=40).state
    assert (second.phase, second.failures, dict(second.weights)) == ("RolledBack", 2, FLOW)


def test_a_good_candidate_walks_every_step_to_promotion() -> None:
    result = plan(target=UNGATED)
    walked = [dict(result.state.weights)]
    now = 0.0
    while result.state.phase != "Promoted":
        assert result.state.phase == "Progressing"
        assert result.requeue_after_s is not None
        now += result.requeue_after_s
        result = plan(result.state, target=UNGATED, metrics=GOOD, now=now)
        if dict(result.state.weights) != walked[-1]:
            walked.append(dict(result.state.weights))
    assert walked == [{"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100}]
    assert now == 180  # 60 s, then 120 s, looked at every 30 s at most
    assert [d.action for d in result.state.history] == [
        "Started",
        "GatesPassed",
        "StepPassed",
        "StepStarted",
        "StepPassed",
        "Promoted",
    ]
    assert dict(result.state.stable_weights) == {"v1": 0, "v2": 100}


def test_silence_holds_forever_by_default() -> None:
    current = PROGRESS_10
    for window in range(1, 30):
        current = plan(current, metrics={}, now=60 * window).state
        assert current.phase == "Inconclusive" and dict(current.weights) == {"v1": 90, "v2": 10}
    assert len(current.history) == HISTORY_LIMIT  # bounded, the newest kept
    assert current.history[-1].at == timestamp(at(60 * 29))


def test_requeue_after() -> None:
    assert plan().requeue_after_s == 30  # gating: every interval
    assert plan(PROGRESS_10, metrics=GOOD, now=50).requeue_after_s == 10  # the hold's end
    deadline = replace(ROLLOUT, deadline_seconds=35)
    assert plan(PROGRESS_10, rollout=deadline, metrics=GOOD, now=20).requeue_after_s == 15
    paused = plan(PROGRESS_10, command="pause").state
    assert paused.paused_from == "Progressing" and plan(paused).requeue_after_s is None


def test_decisions_are_the_new_history_entries() -> None:
    result = plan(PROGRESS_10, metrics=GOOD, now=60)
    assert result.state.history[-len(result.decisions) :] == result.decisions
    assert plan(PROGRESS_10, metrics=GOOD, now=10).decisions == ()


@pytest.mark.parametrize(
    "raw", [None, {}, {"phase": "Unknown"}, {"phase": "Promoted"}, {"phase": "Gating", "step": "x"}]
)
def test_status_not_written_by_the_planner_is_ignored(raw: Any) -> None:
    assert parse_rollout_status(raw) is None


weights_strategy = st.lists(st.integers(0, 100), min_size=1, max_size=6).filter(
    lambda ws: sum(ws) > 0
)


@given(weights_strategy, weights_strategy, st.integers(0, 100))
def test_interpolate(before: list[int], after: list[int], percent: int) -> None:
    names = [f"v{i}" for i in range(max(len(before), len(after)))]
    start = tuple(zip(names, before, strict=False))
    destination = tuple(zip(names, [*after, *[0] * (len(names) - len(after))], strict=True))
    scaled = interpolate(start, destination, percent)
    assert [name for name, _ in scaled] == names
    assert sum(weight for _, weight in scaled) == 100
    if percent == 100:
        assert scaled == interpolate(destination, destination, 0)


def test_probe_traffic_runs_from_its_start_to_the_window_end_and_only_in_that_window() -> None:
    started = plan(PROGRESS_10, rollout=PROBED, metrics=QUIET, now=30)
    assert started.state.probes_started_at == timestamp(at(30))
    assert started.decisions[-1].numbers["v2"]["requests"] == 40
    run = started.probes
    assert run is not None
    assert (run.variants, run.seconds, run.requests_per_second) == (("v1", "v2"), 30, 5)
    # Later looks in the same window: the same run (same key: the same Job), no new decision.
    later = plan(started.state, rollout=PROBED, metrics=QUIET, now=45)
    assert later.decisions == () and later.probes == run
    # The window ends short: Inconclusive, the probes of that window are over; the next window
    # starts its own (another key) once a look finds the users behind again.
    held = plan(later.state, rollout=PROBED, metrics=QUIET, now=60)
    assert held.state.phase == "Inconclusive" and held.probes is None
    assert "(probe samples included)" in held.state.message
    again = plan(held.state, rollout=PROBED, metrics=QUIET, now=90)
    assert again.state.reason == "ProbesStarted"
    assert isinstance(again.probes, ProbeRun) and again.probes.key != run.key
    # A new step is a new window: no probes until a look finds its users behind.
    assert plan(PROBING_10, rollout=PROBED, metrics=GOOD, now=60).probes is None


def test_probes_are_judged_like_for_like() -> None:
    """A candidate judged on probes is compared with the stable variants' probes: a p99 bound
    relative to stable holds against the stable probes' p99, not the users'."""
    rollout = replace(PROBED, analysis=Analysis(p99_latency_ms=Bound(max_ratio_to_stable=2.0)))
    metrics = probed(replace(PROBE_GOOD, p99_latency_ms=30.0))
    # 30 ms > 2 x 10 ms (users' p99 on v1) but < 2 x 20 ms (v1's probes): passes.
    metrics["v1"] = replace(metrics["v1"], p99_latency_ms=10.0)
    result = plan(PROBING_10, rollout=rollout, metrics=metrics, now=60)
    assert result.state.reason == "StepStarted", result.state.message
    slow = probed(replace(PROBE_GOOD, p99_latency_ms=50.0))
    result = plan(PROBING_10, rollout=rollout, metrics=slow, now=30)
    assert result.state.phase == "RolledBack"
    assert "p99 latency ms 50 > 2 x stable 20" in result.state.message


def test_the_shadow_step_mirrors_the_candidate_only_while_shadowing() -> None:
    started = plan(state("Gating", 0, FLOW), rollout=SHADOWED, verdicts=PASSED, now=5)
    assert started.mirror == "v2" and dict(started.state.weights) == FLOW
    assert plan(started.state, rollout=SHADOWED, metrics=MIRRORED_GOOD, now=35).mirror is None
    back = plan(started.state, rollout=SHADOWED, metrics=MIRRORED_BAD, now=10)
    assert back.mirror is None and "shadow disagreement 0.35 > 0.1" in back.state.message
    # Paused while shadowing: nothing mirrored; resumed: mirrored again, a new window.
    paused = plan(started.state, rollout=SHADOWED, command="pause", now=10)
    assert paused.mirror is None
    resumed = plan(paused.state, rollout=SHADOWED, command="resume", now=20)
    assert (resumed.state.phase, resumed.mirror) == ("Shadowing", "v2")
