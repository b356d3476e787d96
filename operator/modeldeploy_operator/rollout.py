"""The rollout plan, pure: from the spec's destination weights, the previous `status.rollout`, the
traffic flowing now, live metrics over the step's window, gate verdicts, a manual command and the
clock, the next rollout state and when to look again.

The spec's weights are the destination and are never rewritten. A new spec generation starts from
the traffic actually flowing; a candidate (a variant whose weight grows) waits for its gate, then
the effective weights walk the steps, each judged on the candidates' metrics; a failure returns to
the stable weights (those flowing when the rollout began). A step that ends without enough samples
is Inconclusive and the low-traffic policy applies (default hold: never promote on silence).

With `spec.rollout.probes`, a look that finds a candidate's user requests behind the pace that
minSamples needs by the window's end starts probe traffic for the rest of the window (sent to the
candidates and the stable variants, counted apart from users). A variant short of user samples
is judged on its probe samples when they reach minSamples, against the stable variants' probe
samples: like for like, never users' numbers against probes'.

With `spec.rollout.shadow`, a single candidate growing from weight 0 first goes through a shadow
step (phase Shadowing): the routes mirror part of the traffic to it, it still answers no user,
and it is judged on how often its answers disagree with the stable variants' (the router's
shadow counters); one that disagrees too much is rolled back before it ever gets weight.
No clock reads: `now` is an argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from modeldeploy_operator.spec import Bound, Rollout
from modeldeploy_operator.traffic import compute_effective_weights

Phase = Literal[
    "Gating", "Shadowing", "Progressing", "Paused", "Inconclusive", "Promoted", "RolledBack"
]
PHASES: tuple[Phase, ...] = (
    "Gating",
    "Shadowing",
    "Progressing",
    "Paused",
    "Inconclusive",
    "Promoted",
    "RolledBack",
)
ACTIVE: frozenset[Phase] = frozenset({"Gating", "Shadowing", "Progressing", "Inconclusive"})
Command = Literal["pause", "resume", "promote", "abort"]
COMMANDS: tuple[Command, ...] = ("pause", "resume", "promote", "abort")
HISTORY_LIMIT = 20
Weights = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Target:
    """What the spec asks for: its generation, the destination weights (spec order), each
    variant's model digest, and the variants that have a gate."""

    generation: int
    weights: Weights
    digests: Mapping[str, str]
    gated: Collection[str] = ()


@dataclass(frozen=True)
class VariantMetrics:
    """One variant's user traffic over the step's window (and its probe traffic, apart)."""

    requests: int = 0
    errors: int = 0
    p99_latency_ms: float | None = None
    shadow_compared: int = 0
    shadow_disagreed: int = 0
    probes: VariantMetrics | None = None

    @property
    def error_rate(self) -> float | None:
        """Errors per request; None without requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def shadow_disagreement(self) -> float | None:
        """Share of shadowed requests whose answers disagreed; None without any."""
        return self.shadow_disagreed / self.shadow_compared if self.shadow_compared else None


@dataclass(frozen=True)
class GateVerdict:
    """A gate's outcome for one model digest of a variant."""

    model_sha256: str
    passed: bool
    summary: str = ""


@dataclass(frozen=True)
class Decision:
    """One decision of the rollout, with the numbers behind it."""

    at: str
    step: int
    action: str
    message: str
    weights: Weights
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The status form."""
        return {
            "time": self.at,
            "step": self.step,
            "action": self.action,
            "message": self.message,
            "weights": _weights_json(self.weights),
            "numbers": dict(self.numbers),
        }


@dataclass(frozen=True)
class RolloutState:
    """`status.rollout`: where the rollout of one spec generation stands."""

    generation: int
    phase: Phase
    step: int
    weights: Weights  # effective: what the routes carry now
    stable_weights: Weights  # where a failure returns to
    started_at: str
    step_started_at: str
    reason: str
    message: str
    failures: int = 0
    paused_from: Phase | None = None
    pending_gates: tuple[str, ...] = ()
    history: tuple[Decision, ...] = ()
    probes_started_at: str | None = None

    def as_status(self) -> dict[str, Any]:
        """The status form (camelCase, JSON)."""
        document: dict[str, Any] = {
            "generation": self.generation,
            "phase": self.phase,
            "step": self.step,
            "weights": _weights_json(self.weights),
            "stableWeights": _weights_json(self.stable_weights),
            "startedAt": self.started_at,
            "stepStartedAt": self.step_started_at,
            "reason": self.reason,
            "message": self.message,
            "failures": self.failures,
            "pendingGates": list(self.pending_gates),
            "history": [decision.as_json() for decision in self.history],
        }
        if self.paused_from is not None:
            document["pausedFrom"] = self.paused_from
        if self.probes_started_at is not None:
            document["probesStartedAt"] = self.probes_started_at
        return document

    def probing(self) -> bool:
        """Whether probe traffic was started in the current step's window."""
        return (
            self.phase in ("Progressing", "Inconclusive")
            and self.probes_started_at is not None
            and _parse_time(self.probes_started_at) >= _parse_time(self.step_started_at)
        )


@dataclass(frozen=True)
class ProbeRun:
    """Probe traffic for the rest of a step's window: which variants, for how long, how fast;
    `key` names the window (the same for every plan of it, another for the next)."""

    key: str
    variants: tuple[str, ...]
    seconds: int
    requests_per_second: int


@dataclass(frozen=True)
class RolloutPlan:
    """The next state, the decisions taken now (one event each) and when to look again."""

    state: RolloutState
    decisions: tuple[Decision, ...]
    requeue_after_s: float | None
    probes: ProbeRun | None = None
    # The candidate the routes mirror traffic to (the shadow step), if any.
    mirror: str | None = None


def parse_rollout_status(raw: Mapping[str, Any] | None) -> RolloutState | None:
    """The previous `status.rollout`, or None when there is none or it is not one we wrote."""
    if not isinstance(raw, Mapping) or raw.get("phase") not in PHASES:
        return None
    try:
        return RolloutState(
            generation=int(raw["generation"]),
            phase=raw["phase"],
            step=int(raw["step"]),
            weights=_weights_from_json(raw["weights"]),
            stable_weights=_weights_from_json(raw["stableWeights"]),
            started_at=str(raw["startedAt"]),
            step_started_at=str(raw["stepStartedAt"]),
            reason=str(raw["reason"]),
            message=str(raw["message"]),
            failures=int(raw.get("failures", 0)),
            paused_from=raw.get("pausedFrom") if raw.get("pausedFrom") in PHASES else None,
            pending_gates=tuple(str(name) for name in raw.get("pendingGates", ())),
            probes_started_at=str(raw["probesStartedAt"]) if "probesStartedAt" in raw else None,
            history=tuple(
                Decision(
                    at=str(entry["time"]),
                    step=int(entry["step"]),
                    action=str(entry["action"]),
                    message=str(entry["message"]),
                    weights=_weights_from_json(entry["weights"]),
                    numbers=dict(entry.get("numbers", {})),
                )
                for entry in raw.get("history", ())
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _weights_json(weights: Weights) -> dict[str, int]:
    return dict(weights)


def _weights_from_json(raw: Any) -> Weights:
    return tuple((str(name), int(weight)) for name, weight in dict(raw).items())


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes writes times."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def interpolate(start: Weights, destination: Weights, percent: int) -> Weights:
    """The weights `percent` of the way from start to destination (integers summing to 100)."""
    before = dict(start)
    scaled = [
        (name, before.get(name, 0) * (100 - percent) + weight * percent)
        for name, weight in destination
    ]
    result = compute_effective_weights(scaled, {name for name, _ in destination})
    return tuple(result.items())


def _flowing(target: Target, flowing: Mapping[str, int]) -> Weights:
    """The traffic flowing now over the spec's variants (a removed variant's share goes to the
    others); with nothing flowing, the destination without the gated variants."""
    names = [name for name, _ in target.weights]
    current = [(name, flowing.get(name, 0)) for name in names]
    if sum(weight for _, weight in current) > 0:
        return tuple(compute_effective_weights(current, set(names)).items())
    ungated = {name for name in names if name not in target.gated}
    return tuple(compute_effective_weights(target.weights, ungated).items())


def candidates(start: Weights, destination: Weights) -> list[str]:
    """The variants whose weight grows (spec order)."""
    before = dict(start)
    return [name for name, weight in destination if weight > before.get(name, 0)]


class _Planner:
    """One planning call: the inputs, the state so far and the decisions taken."""

    def __init__(
        self,
        target: Target,
        rollout: Rollout,
        metrics: Mapping[str, VariantMetrics],
        verdicts: Mapping[str, GateVerdict],
        now: datetime,
    ) -> None:
        self.target = target
        self.rollout = rollout
        self.metrics = metrics
        self.verdicts = verdicts
        self.now = now
        self.stamp = timestamp(now)
        self.decisions: list[Decision] = []

    def decide(
        self,
        state: RolloutState,
        action: str,
        message: str,
        numbers: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> RolloutState:
        """The state with `changes`, reason `action`, and the decision recorded."""
        state = replace(state, reason=action, message=message, **changes)
        decision = Decision(self.stamp, state.step, action, message, state.weights, numbers or {})
        self.decisions.append(decision)
        return replace(state, history=(*state.history, decision)[-HISTORY_LIMIT:])

    def start(self, flowing: Mapping[str, int]) -> RolloutState:
        """A rollout of a new generation, from the traffic flowing now."""
        start = _flowing(self.target, flowing)
        state = RolloutState(
            generation=self.target.generation,
            phase="Gating",
            step=0,
            weights=start,
            stable_weights=start,
            started_at=self.stamp,
            step_started_at=self.stamp,
            reason="",
            message="",
        )
        return self.decide(
            state, "Started", f"generation {self.target.generation} from {_show(start)}"
        )

    def promote(self, state: RolloutState, action: str, message: str) -> RolloutState:
        """Done: the destination weights become the stable ones."""
        weights = self.target.weights
        return self.decide(
            state,
            action,
            message,
            phase="Promoted",
            weights=weights,
            stable_weights=weights,
            step=len(self.rollout.steps),
            pending_gates=(),
            paused_from=None,
        )

    def roll_back(
        self,
        state: RolloutState,
        action: str,
        message: str,
        numbers: Mapping[str, Any] | None = None,
    ) -> RolloutState:
        """Back to the stable weights until the spec changes again."""
        return self.decide(
            state,
            action,
            message,
            numbers,
            phase="RolledBack",
            weights=state.stable_weights,
            pending_gates=(),
            paused_from=None,
        )

    def command(self, state: RolloutState, command: Command) -> RolloutState:
        """A person's pause, resume, promote or abort (ignored where it means nothing)."""
        if command == "promote" and state.phase != "Promoted":
            return self.promote(state, "ManualPromote", "promoted by hand")
        if command == "abort" and (state.phase in ACTIVE or state.phase == "Paused"):
            return self.roll_back(state, "Aborted", "aborted by hand")
        if command == "pause" and state.phase in ACTIVE:
            return self.decide(
                state, "Paused", "paused by hand", phase="Paused", paused_from=state.phase
            )
        if command == "resume" and state.phase == "Paused":
            return self.decide(
                state,
                "Resumed",
                "resumed by hand; the step's window starts again",
                phase=state.paused_from or "Progressing",
                paused_from=None,
                step_started_at=self.stamp,
            )
        return state

    def gate(self, state: RolloutState) -> RolloutState:
        """Gating: every gated candidate needs a passed verdict for its current digest."""
        growing = candidates(state.stable_weights, self.target.weights)
        if not growing:
            return self.promote(state, "Promoted", "the traffic already flows as the spec asks")
        pending: list[str] = []
        for name in growing:
            if name not in self.target.gated:
                continue
            verdict = self.verdicts.get(name)
            if verdict is None or verdict.model_sha256 != self.target.digests.get(name):
                pending.append(name)
            elif not verdict.passed:
                return self.roll_back(
                    state,
                    "GateFailed",
                    f"variant {name}: {verdict.summary or 'its gate failed'}",
                    {"variant": name, "modelSha256": verdict.model_sha256},
                )
        if pending:
            if tuple(pending) != state.pending_gates:
                return self.decide(
                    state,
                    "Gating",
                    f"waiting for the gates of {', '.join(pending)}",
                    pending_gates=tuple(pending),
                )
            return state
        if not self.rollout.steps or sum(w for _, w in state.stable_weights) == 0:
            return self.promote(state, "Promoted", "gates passed; no steps to walk")
        if self.rollout.shadow is not None:
            return self.enter_shadow(state, growing)
        return self.enter_step(state, 0, "GatesPassed", "gates passed")

    def enter_shadow(self, state: RolloutState, growing: Sequence[str]) -> RolloutState:
        """Mirror traffic to the single candidate before it gets weight (else skip the step)."""
        assert self.rollout.shadow is not None
        if len(growing) != 1 or dict(state.stable_weights).get(growing[0], 0) > 0:
            why = f"shadow step skipped: {', '.join(growing)} " + (
                "already has weight" if len(growing) == 1 else "are several candidates"
            )
            return self.enter_step(state, 0, "GatesPassed", why)
        shadow = self.rollout.shadow
        return self.decide(
            state,
            "ShadowStarted",
            f"gates passed; {shadow.percent}% of the traffic mirrored to {growing[0]} (no "
            f"weight) for {shadow.hold_seconds} s",
            phase="Shadowing",
            step=0,
            weights=state.stable_weights,
            step_started_at=self.stamp,
            pending_gates=(),
        )

    def analyse_shadow(self, state: RolloutState) -> RolloutState:
        """Shadowing: judge the candidate's disagreement with the stable answers."""
        assert self.rollout.shadow is not None
        (name,) = candidates(state.stable_weights, self.target.weights)
        observed = self.metrics.get(name, VariantMetrics())
        minimum = self.rollout.min_samples
        numbers: dict[str, Any] = {"minSamples": minimum, name: _metrics_json(observed)}
        bound = self.rollout.analysis.shadow_disagreement.max
        disagreement = observed.shadow_disagreement
        if (
            observed.shadow_compared >= minimum
            and bound is not None
            and disagreement is not None
            and disagreement > bound
        ):
            violation = f"{name}: shadow disagreement {disagreement:.4g} > {bound:.4g}"
            return self.fail(state, [violation], numbers)
        elapsed = (self.now - _parse_time(state.step_started_at)).total_seconds()
        if elapsed < self.rollout.shadow.hold_seconds:
            return state
        if observed.shadow_compared >= minimum:
            state = self.decide(state, "ShadowPassed", f"{name} agrees enough", numbers)
            return self.enter_step(state, 0, "StepStarted", "shadow step passed")
        why = f"{name} was compared on fewer than {minimum} mirrored requests in the window"
        policy = self.rollout.low_traffic
        if policy == "rollback":
            return self.roll_back(state, "Inconclusive", f"{why}; policy rollback", numbers)
        if policy == "promote":
            state = self.decide(state, "Inconclusive", f"{why}; policy promote", numbers)
            return self.enter_step(state, 0, "StepStarted", "shadow step inconclusive")
        return self.decide(
            state,
            "Inconclusive",
            f"{why}; policy hold: still mirrored, a new window starts",
            numbers,
            step_started_at=self.stamp,
        )

    def fail(
        self, state: RolloutState, violations: Sequence[str], numbers: Mapping[str, Any]
    ) -> RolloutState:
        """A failed analysis: rolled back past the failure limit, else a new window."""
        failures = state.failures + 1
        message = "; ".join(violations)
        if failures > self.rollout.failure_limit:
            return self.roll_back(replace(state, failures=failures), "RolledBack", message, numbers)
        return self.decide(
            state,
            "AnalysisFailed",
            f"{message} (failure {failures} of {self.rollout.failure_limit} tolerated)",
            numbers,
            failures=failures,
            step_started_at=self.stamp,
        )

    def enter_step(self, state: RolloutState, step: int, action: str, why: str) -> RolloutState:
        """Route the weights of `step` and start its window."""
        percent = self.rollout.steps[step].percent
        weights = interpolate(state.stable_weights, self.target.weights, percent)
        return self.decide(
            state,
            action,
            f"{why}; step {step + 1}/{len(self.rollout.steps)}: {_show(weights)}",
            phase="Progressing",
            step=step,
            weights=weights,
            step_started_at=self.stamp,
            pending_gates=(),
        )

    def advance(self, state: RolloutState, action: str, why: str, numbers: Any) -> RolloutState:
        """The step is over: the next one, or promotion after the last."""
        state = self.decide(state, action, why, numbers)
        if state.step + 1 >= len(self.rollout.steps):
            return self.promote(state, "Promoted", f"all {len(self.rollout.steps)} steps passed")
        return self.enter_step(
            state, state.step + 1, "StepStarted", f"step {state.step + 1} passed"
        )

    def analyse(self, state: RolloutState) -> RolloutState:
        """Progressing or Inconclusive: judge the candidates' metrics over the step's window."""
        growing = candidates(state.stable_weights, self.target.weights)
        stable_names = [name for name, weight in state.stable_weights if weight > 0]
        reference = _sum_metrics(
            [
                self.metrics.get(name, VariantMetrics())
                for name in stable_names
                if name not in growing
            ]
        )
        numbers: dict[str, Any] = {"minSamples": self.rollout.min_samples}
        numbers["stable"] = _metrics_json(reference)
        violations: list[str] = []
        short: list[str] = []
        behind: list[str] = []
        elapsed = (self.now - _parse_time(state.step_started_at)).total_seconds()
        hold = self.rollout.steps[state.step].hold_seconds
        minimum = self.rollout.min_samples
        for name in growing:
            observed = self.metrics.get(name, VariantMetrics())
            numbers[name] = _metrics_json(observed)
            judged, against = observed, reference
            if observed.requests < minimum:
                if observed.requests * hold < minimum * elapsed:
                    behind.append(name)
                judged = observed.probes or VariantMetrics()
                against = reference.probes or VariantMetrics()
                if judged.requests < minimum:
                    short.append(name)
                    continue
            violations += [f"{name}: {v}" for v in _violations(judged, against, self.rollout)]
        if violations:
            return self.fail(state, violations, numbers)
        if elapsed < hold:
            if behind and self.rollout.probes is not None and not state.probing():
                return self.decide(
                    state,
                    "ProbesStarted",
                    f"{', '.join(behind)} behind the pace of {minimum} requests in "
                    f"{hold} s; probe traffic until the window ends",
                    numbers,
                    probes_started_at=self.stamp,
                )
            return state
        if not short:
            return self.advance(state, "StepPassed", "every candidate within bounds", numbers)
        why = (
            f"{', '.join(short)} answered fewer than {self.rollout.min_samples} requests in the "
            "step's window"
        )
        policy = self.rollout.low_traffic
        if state.probing():
            why += " (probe samples included)"
        if policy == "rollback":
            return self.roll_back(state, "Inconclusive", f"{why}; policy rollback", numbers)
        if policy == "promote":
            return self.advance(state, "Inconclusive", f"{why}; policy promote", numbers)
        return self.decide(
            state,
            "Inconclusive",
            f"{why}; policy hold: the weights stay and a new window starts",
            numbers,
            phase="Inconclusive",
            step_started_at=self.stamp,
        )

    def _hold(self, state: RolloutState) -> int:
        if state.phase == "Shadowing" and self.rollout.shadow is not None:
            return self.rollout.shadow.hold_seconds
        return self.rollout.steps[state.step].hold_seconds

    def requeue_after(self, state: RolloutState) -> float | None:
        """When to look again: None when only a spec change or a command can move it."""
        interval = float(self.rollout.interval_seconds)
        if state.phase == "Gating":
            delay = interval
        elif state.phase in ("Shadowing", "Progressing", "Inconclusive"):
            hold = self._hold(state)
            elapsed = (self.now - _parse_time(state.step_started_at)).total_seconds()
            delay = min(interval, max(hold - elapsed, 1.0))
        else:
            return None
        deadline = self.rollout.deadline_seconds
        if deadline is not None:
            left = deadline - (self.now - _parse_time(state.started_at)).total_seconds()
            delay = min(delay, max(left, 1.0))
        return delay


def plan_rollout(
    target: Target,
    rollout: Rollout,
    previous: RolloutState | None,
    flowing: Mapping[str, int],
    metrics: Mapping[str, VariantMetrics],
    verdicts: Mapping[str, GateVerdict],
    command: Command | None,
    now: datetime,
) -> RolloutPlan:
    """The next rollout state of `target` (see the module's docstring)."""
    planner = _Planner(target, rollout, metrics, verdicts, now)
    if previous is None or previous.generation != target.generation:
        state = planner.start(flowing)
    else:
        state = previous
    if command is not None:
        state = planner.command(state, command)
    deadline = rollout.deadline_seconds
    if (
        state.phase in ACTIVE
        and deadline is not None
        and now >= _parse_time(state.started_at) + timedelta(seconds=deadline)
    ):
        state = planner.roll_back(
            state, "DeadlineExceeded", f"not promoted within {deadline} s of its start"
        )
    if state.phase == "Gating":
        state = planner.gate(state)
    elif state.phase == "Shadowing" and rollout.shadow is not None:
        state = planner.analyse_shadow(state)
    elif state.phase in ("Progressing", "Inconclusive"):
        state = planner.analyse(state)
    mirrored = None
    if state.phase == "Shadowing":
        mirrored = candidates(state.stable_weights, target.weights)[0]
    return RolloutPlan(
        state,
        tuple(planner.decisions),
        planner.requeue_after(state),
        probe_run(state, target, rollout),
        mirrored,
    )


def probe_run(state: RolloutState, target: Target, rollout: Rollout) -> ProbeRun | None:
    """The probe traffic of the current window, or None: to the stable variants and the
    candidates, from when it was started to the window's end."""
    if rollout.probes is None or not state.probing() or state.probes_started_at is None:
        return None
    growing = candidates(state.stable_weights, target.weights)
    stable = [name for name, weight in state.stable_weights if weight > 0 and name not in growing]
    started = _parse_time(state.probes_started_at)
    end = _parse_time(state.step_started_at) + timedelta(
        seconds=rollout.steps[state.step].hold_seconds
    )
    digests = ",".join(f"{name}@{target.digests.get(name, '')}" for name in growing)
    window = f"{state.generation}/{state.step}/{state.probes_started_at}/{digests}"
    return ProbeRun(
        key=hashlib.sha256(window.encode()).hexdigest()[:10],
        variants=(*stable, *growing),
        seconds=max(int((end - started).total_seconds()), 1),
        requests_per_second=rollout.probes.requests_per_second,
    )


def _sum_metrics(parts: Sequence[VariantMetrics]) -> VariantMetrics:
    """The stable variants together (p99: the worst of them), their probes likewise."""
    latencies = [m.p99_latency_ms for m in parts if m.p99_latency_ms is not None]
    probes = [m.probes for m in parts if m.probes is not None]
    return VariantMetrics(
        requests=sum(m.requests for m in parts),
        errors=sum(m.errors for m in parts),
        p99_latency_ms=max(latencies) if latencies else None,
        shadow_compared=sum(m.shadow_compared for m in parts),
        shadow_disagreed=sum(m.shadow_disagreed for m in parts),
        probes=_sum_metrics(probes) if probes else None,
    )


def _metrics_json(metrics: VariantMetrics) -> dict[str, Any]:
    document: dict[str, Any] = {
        "requests": metrics.requests,
        "errors": metrics.errors,
        "errorRate": metrics.error_rate,
        "p99LatencyMs": metrics.p99_latency_ms,
        "shadowCompared": metrics.shadow_compared,
        "shadowDisagreed": metrics.shadow_disagreed,
    }
    if metrics.probes is not None:
        probes = metrics.probes
        document["probes"] = {
            "requests": probes.requests,
            "errors": probes.errors,
            "errorRate": probes.error_rate,
            "p99LatencyMs": probes.p99_latency_ms,
        }
    return document


def _violations(observed: VariantMetrics, reference: VariantMetrics, rollout: Rollout) -> list[str]:
    """Each bound the candidate's metrics exceed, in words with the numbers."""
    analysis = rollout.analysis
    checks: list[tuple[str, float | None, float | None, Bound]] = [
        ("error rate", observed.error_rate, reference.error_rate, analysis.error_rate),
        (
            "p99 latency ms",
            observed.p99_latency_ms,
            reference.p99_latency_ms,
            analysis.p99_latency_ms,
        ),
        (
            "shadow disagreement",
            observed.shadow_disagreement,
            reference.shadow_disagreement,
            analysis.shadow_disagreement,
        ),
    ]
    found = []
    for label, value, stable, bound in checks:
        if value is None:
            continue
        if bound.max is not None and value > bound.max:
            found.append(f"{label} {value:.4g} > {bound.max:.4g}")
        ratio = bound.max_ratio_to_stable
        if ratio is not None and stable is not None and value > stable * ratio:
            found.append(f"{label} {value:.4g} > {ratio:g} x stable {stable:.4g}")
    return found


def _show(weights: Weights) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights)
