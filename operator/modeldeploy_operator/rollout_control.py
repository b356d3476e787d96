"""The rollout inside the operator's plan, pure: what `plan_rollout` is given (the target from the
spec, the previous state and the traffic flowing from the status, a person's command from an
annotation) and what its answer becomes (the weights routed, `status.rollout`, one event per
decision, the Degraded condition after a rollback).

A command is the annotation `modeldeploy.dev/rollout-command`: `pause`, `resume`, `promote` or
`abort`, optionally followed by `@<anything>` so the same command can be given twice. The value
handled last is acknowledged in `status.rollout.command`; a value equal to it is not a new command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from modeldeploy_operator.rollout import (
    ACTIVE,
    COMMANDS,
    Command,
    Decision,
    GateVerdict,
    ProbeRun,
    RolloutState,
    Target,
    VariantMetrics,
    parse_rollout_status,
    plan_rollout,
)
from modeldeploy_operator.rollout_metrics import (
    RouterCounters,
    WindowQuery,
    counters_json,
    parse_counters_json,
)
from modeldeploy_operator.spec import ROLLOUT_COMMAND_ANNOTATION, ModelDeployment, Shadow
from modeldeploy_operator.status import Event

COMMAND_ANNOTATION = ROLLOUT_COMMAND_ANNOTATION
# Decisions a person should look at.
WARNING_ACTIONS = frozenset(
    {"RolledBack", "GateFailed", "AnalysisFailed", "DeadlineExceeded", "Aborted", "Inconclusive"}
)


@dataclass(frozen=True)
class RolloutOutcome:
    """The rollout's part of one plan."""

    weights: tuple[tuple[str, int], ...]  # what the routes carry (before readiness)
    status: dict[str, Any]  # status.rollout
    events: tuple[Event, ...]
    degraded: tuple[str, str] | None  # (reason, message) while rolled back
    requeue_after_s: float | None
    probes: ProbeRun | None  # the current window's probe traffic
    mirror: Shadow | None  # the shadow step's mirroring to the candidate


def target_of(md: ModelDeployment) -> Target:
    """What the spec asks for."""
    return Target(
        generation=md.generation,
        weights=tuple(md.spec_weights),
        digests={v.name: v.model.sha256 for v in md.variants},
        gated=tuple(v.name for v in md.variants if v.gate is not None),
    )


def command_of(annotations: Mapping[str, str] | None) -> str:
    """The command annotation's value ("" without one)."""
    return (annotations or {}).get(COMMAND_ANNOTATION, "")


def parse_command(value: str) -> Command | None:
    """`pause`, `pause@2026-12-01T18:00:00Z`... -> pause; None for anything else."""
    word = value.split("@", 1)[0].strip().lower()
    return word if word in COMMANDS else None


def flowing_from(previous: Mapping[str, Any] | None) -> dict[str, int]:
    """The traffic flowing now as the previous status says: the rollout's weights when there was
    one, else each variant's effective weight."""
    state = parse_rollout_status((previous or {}).get("rollout"))
    if state is not None:
        return dict(state.weights)
    return {
        str(row["name"]): int(row.get("effectiveWeight") or 0)
        for row in (previous or {}).get("variants", [])
        if "name" in row
    }


def plan_md_rollout(
    md: ModelDeployment,
    previous: Mapping[str, Any] | None,
    metrics: Mapping[str, VariantMetrics],
    verdicts: Mapping[str, GateVerdict],
    now: str,
    counters: RouterCounters | None = None,
) -> RolloutOutcome | None:
    """The rollout's part of the plan at `now` (RFC 3339); None when the spec has no `rollout`.

    `counters` are the routers' counters read now (the direct source): when a window begins now
    they are its baseline, kept in `status.rollout.baseline` while the window lasts."""
    if md.rollout is None:
        return None
    raw = (previous or {}).get("rollout")
    before = parse_rollout_status(raw)
    acknowledged = str((raw or {}).get("command", "")) if isinstance(raw, Mapping) else ""
    value = md.rollout_command
    command = parse_command(value) if value and value != acknowledged else None
    planned = plan_rollout(
        target_of(md),
        md.rollout,
        before,
        flowing_from(previous),
        metrics,
        verdicts,
        command,
        datetime.fromisoformat(now),
    )
    state = planned.state
    events = [decision_event(d) for d in planned.decisions]
    if value and value != acknowledged and command is None:
        events.append(
            Event(
                "Warning",
                "UnknownCommand",
                f"{COMMAND_ANNOTATION}={value!r} ignored: expected one of {', '.join(COMMANDS)}",
            )
        )
    status = state.as_status()
    if value:
        status["command"] = value
    baseline = window_baseline(state, raw, counters, now)
    if baseline is not None:
        status["baseline"] = baseline
    return RolloutOutcome(
        weights=state.weights,
        status=status,
        events=tuple(events),
        degraded=rolled_back(state),
        requeue_after_s=planned.requeue_after_s,
        probes=planned.probes,
        mirror=shadow_step_mirror(md, planned.mirror),
    )


def shadow_step_mirror(md: ModelDeployment, candidate: str | None) -> Shadow | None:
    """The routes' shadow while the shadow step mirrors traffic to `candidate`."""
    step = md.rollout.shadow if md.rollout is not None else None
    if candidate is None or step is None:
        return None
    return Shadow(variant=candidate, percent=step.percent, tolerance=step.tolerance)


def window_baseline(
    state: RolloutState,
    raw: Mapping[str, Any] | None,
    counters: RouterCounters | None,
    now: str,
) -> dict[str, Any] | None:
    """`status.rollout.baseline`: the routers' counters when the current step's window began
    (read now when it begins now, else as the previous status kept them); None without one."""
    if state.phase not in ("Progressing", "Inconclusive"):
        return None
    began = datetime.fromisoformat(state.step_started_at)
    if counters is not None and began == datetime.fromisoformat(now):
        routers = {
            target: {variant: counters_json(c) for variant, c in sorted(by_variant.items())}
            for target, by_variant in sorted(counters.items())
        }
        return {"at": state.step_started_at, "routers": routers}
    kept = (raw or {}).get("baseline") if isinstance(raw, Mapping) else None
    if isinstance(kept, Mapping) and _same_time(kept.get("at"), began):
        return dict(kept)
    return None


def parse_baseline(raw: Mapping[str, Any] | None, since: datetime) -> RouterCounters | None:
    """The counters `status.rollout.baseline` kept for the window begun at `since`, or None."""
    kept = (raw or {}).get("baseline")
    if not isinstance(kept, Mapping) or not _same_time(kept.get("at"), since):
        return None
    try:
        return {
            str(target): {str(v): parse_counters_json(c) for v, c in dict(by_variant).items()}
            for target, by_variant in dict(kept["routers"]).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _same_time(text: Any, when: datetime) -> bool:
    try:
        return isinstance(text, str) and datetime.fromisoformat(text) == when
    except ValueError:
        return False


def decision_event(decision: Decision) -> Event:
    """One event per decision, with the weights it left routed."""
    weights = ",".join(f"{name}={weight}" for name, weight in decision.weights)
    return Event(
        "Warning" if decision.action in WARNING_ACTIONS else "Normal",
        f"Rollout{decision.action}",
        f"{decision.message} (weights {weights})",
    )


def rolled_back(state: RolloutState) -> tuple[str, str] | None:
    """Degraded's reason and message while the rollout stays rolled back, with the numbers of the
    decision that did it; None otherwise."""
    if state.phase != "RolledBack":
        return None
    weights = ",".join(f"{name}={weight}" for name, weight in state.weights)
    last = next((d for d in reversed(state.history) if d.action == state.reason), None)
    numbers = f"; numbers {_show_numbers(last.numbers)}" if last and last.numbers else ""
    message = f"{state.reason}: {state.message}; back on {weights}{numbers}"
    return "RolledBack", message


def _show_numbers(numbers: Mapping[str, Any]) -> str:
    parts = []
    for key, value in numbers.items():
        if isinstance(value, Mapping):
            shown = ", ".join(f"{k}={_number(v)}" for k, v in value.items() if v is not None)
            parts.append(f"{key}: {shown}")
        else:
            parts.append(f"{key}={_number(value)}")
    return "; ".join(parts)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def window_query(
    md: ModelDeployment,
    previous: Mapping[str, Any] | None,
    endpoint_slices: Sequence[Mapping[str, Any]],
    now: str,
) -> WindowQuery | None:
    """The step window to read metrics for, or None when the rollout needs no numbers now.

    Numbers are read while the rollout of the current generation may still move (a new generation
    too: its first step's window starts with that read), over the window begun at
    `status.rollout.stepStartedAt`; the routers are the ready endpoints of the router Service."""
    if md.rollout is None:
        return None
    state = parse_rollout_status((previous or {}).get("rollout"))
    current = state is not None and state.generation == md.generation
    if current and state is not None and state.phase not in (*ACTIVE, "Paused"):
        return None
    since = datetime.fromisoformat(state.step_started_at if current and state else now)
    raw = (previous or {}).get("rollout")
    return WindowQuery(
        namespace=md.namespace,
        name=md.name,
        variants=tuple(v.name for v in md.variants),
        since=since,
        now=datetime.fromisoformat(now),
        targets=router_metrics_urls(endpoint_slices),
        prometheus_url=md.rollout.analysis.prometheus_url,
        baseline=parse_baseline(raw, since) if current and isinstance(raw, Mapping) else None,
    )


def router_metrics_urls(endpoint_slices: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """http://<address>:<port>/metrics of every ready endpoint of the router Service's slices."""
    urls = []
    for slice_ in endpoint_slices:
        ports = slice_.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == "http"), None)
        if port is None and ports:
            port = ports[0].get("port")
        if port is None:
            continue
        for endpoint in slice_.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if ":" in address else address
                urls.append(f"http://{host}:{port}/metrics")
    return tuple(sorted(urls))
