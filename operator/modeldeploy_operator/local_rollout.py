"""`modeldeploy run`'s rollout: the operator's plan (rollout_control.plan_md_rollout) run on this
machine, judged on the local router's own /metrics (the direct source), its weights written into
the router's routes file.

Each edit of the YAML file that changes only weights, gates or `spec.rollout` is a new generation,
rolled out from the traffic flowing, as in a cluster; an edit that would need other processes
(variants added or removed, another model) is reported and needs a restart.

What a cluster runs as Jobs runs here as child processes with the same arguments, the Services'
URLs replaced by the local ones: each gated variant's gate (`modeldeploy-server gate`, again
whenever its arguments change), its verdict read from the termination message it writes; and
a window's probe traffic (`modeldeploy-server probe` through the local router), stopped when
the window is over. A gate that cannot judge (exit 2) fails here at once (a cluster's Job
retries it first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from modeldeploy_operator import naming
from modeldeploy_operator.gate_jobs import (
    TERMINATION_MESSAGE_PATH,
    dataset_args,
    gate_args,
    probe_args,
    probe_dataset,
    verdict_of,
)
from modeldeploy_operator.render import render_routes_config
from modeldeploy_operator.rollout import GateVerdict, ProbeRun, VariantMetrics, timestamp
from modeldeploy_operator.rollout_control import plan_md_rollout, window_query
from modeldeploy_operator.rollout_sources import DirectMetrics
from modeldeploy_operator.spec import Gate, ModelDeployment, ModelSource, Shadow

Say = Callable[[str], None]
# The file's new ModelDeployment, why it cannot be read, or None while it has not changed.
Reload = Callable[[], ModelDeployment | str | None]
IDLE_LOOK_S = (
    5.0  # how often a rollout that needs no look (promoted, no spec.rollout) is re-planned
)


class Jobs(Protocol):
    """Runs `modeldeploy-server ARGS` as a child that is expected to end (a gate, a probe)."""

    def start_job(self, name: str, args: Sequence[str]) -> None: ...

    def job_exit_code(self, name: str) -> int | None: ...

    def stop_job(self, name: str) -> None: ...


def same_processes(a: ModelDeployment, b: ModelDeployment) -> bool:
    """Whether `b` runs on the processes started for `a` (only weights, gates, rollout differ)."""

    def processes(md: ModelDeployment) -> Any:
        variants = [dataclasses.replace(v, weight=0, gate=None) for v in md.variants]
        return md.name, variants, md.routing, md.example_instance

    return bool(processes(a) == processes(b))


class LocalRollout:
    """The rollout of one local run: its state, the local router's counters, the routes file."""

    def __init__(
        self,
        md: ModelDeployment,
        urls: Mapping[str, str],
        router_url: str,
        routes_path: Path,
        say: Say,
        reload: Reload | None,
        jobs: Jobs,
        dataset_location: Callable[[ModelSource], str],
    ) -> None:
        self.md = md
        self.urls = dict(urls)
        self.router_url = router_url
        self.router_metrics = f"{router_url}/metrics"
        self.routes_path = routes_path
        self.say = say
        self.reload = reload
        self.jobs = jobs
        self.dataset_location = dataset_location
        self.status: dict[str, Any] = {}
        self.weights = dict(md.spec_weights)
        self.source = DirectMetrics()
        self.next_look = 0.0
        # Gate runs by variant: (job name, digest); the verdicts of those that ended.
        self.gates: dict[str, tuple[str, str]] = {}
        self.verdicts: dict[str, GateVerdict] = {}
        self.probe_job: str | None = None
        self.mirror: Shadow | None = None  # the shadow step's, in the routes

    def tick(self, now: datetime | None = None) -> None:
        """Pick up an edited file, and plan when the rollout wants a look."""
        changed = self.reload() if self.reload is not None else None
        if isinstance(changed, str):
            self.say(f"  not applied: {changed}")
        elif changed is not None:
            self.apply_edit(changed)
        gates_ended = self.run_gates()
        if time.monotonic() < self.next_look and not gates_ended:
            return
        stamp = timestamp(now or datetime.now(UTC))
        # What flows now, as a cluster's status says it (the rollout's weights take precedence).
        rows = [{"name": name, "effectiveWeight": w} for name, w in self.weights.items()]
        previous = {**self.status, "variants": rows}
        query = window_query(self.md, previous, (), stamp)
        metrics: Mapping[str, VariantMetrics] = {}
        if query is not None:
            metrics = self.source.window(dataclasses.replace(query, targets=(self.router_metrics,)))
        outcome = plan_md_rollout(self.md, previous, metrics, self.verdicts, stamp)
        weights = dict(outcome.weights) if outcome is not None else dict(self.md.spec_weights)
        for event in outcome.events if outcome is not None else ():
            self.say(f"  rollout {event.reason.removeprefix('Rollout')}: {event.message}")
        if outcome is not None:
            self.status = {"rollout": outcome.status}
        mirror = outcome.mirror if outcome is not None else None
        if weights != self.weights or mirror != self.mirror:
            self.write_routes(weights, mirror)
        self.run_probes(outcome.probes if outcome is not None else None)
        requeue = outcome.requeue_after_s if outcome is not None else None
        self.next_look = time.monotonic() + (requeue or IDLE_LOOK_S)

    def run_gates(self) -> bool:
        """Start the gate of each gated variant whose arguments changed; read the verdicts of
        those that ended. Whether a verdict arrived (the plan should look now)."""
        arrived = False
        for variant in self.md.variants:
            if variant.gate is None:
                continue
            args = self.local_args(gate_args(self.md, variant), variant.gate)
            message = self.routes_path.with_name(f"gate-{variant.name}.json")
            args = [str(message) if a == TERMINATION_MESSAGE_PATH else a for a in args]
            name = f"gate-{variant.name}-{hashlib.sha256(repr(args).encode()).hexdigest()[:10]}"
            if self.gates.get(variant.name, ("", ""))[0] != name:
                message.unlink(missing_ok=True)
                self.verdicts.pop(variant.name, None)
                self.gates[variant.name] = (name, variant.model.sha256)
                self.jobs.start_job(name, args)
                self.say(f"  gate {variant.name}: running")
                continue
            code = self.jobs.job_exit_code(name)
            if code is None or variant.name in self.verdicts:
                continue
            text = message.read_text() if message.exists() else ""
            verdict = verdict_of(code, text, variant.model.sha256) or GateVerdict(
                variant.model.sha256, False, f"gate could not judge (exit {code}): {text[:300]}"
            )
            self.verdicts[variant.name] = verdict
            self.say(f"  gate {variant.name}: {verdict.summary}")
            arrived = True
        return arrived

    def run_probes(self, probes: ProbeRun | None) -> None:
        """Run the window's probe traffic through the local router; stop what is no longer."""
        name = None if probes is None else naming.COMPONENT_PROBE + "-" + probes.key
        if self.probe_job is not None and self.probe_job != name:
            self.jobs.stop_job(self.probe_job)
            self.probe_job = None
        if probes is not None and name is not None and self.probe_job is None:
            args = probe_args(self.md, probes, self.router_url)
            self.jobs.start_job(name, self.local_args(args, probe_dataset(self.md, probes)))
            self.probe_job = name
            self.say(f"  probes: {probes.requests_per_second}/s for {probes.seconds} s")

    def local_args(self, args: Sequence[str], gate: Gate) -> list[str]:
        """A Job's arguments for this machine: the variants' local URLs for their Services', the
        dataset's local location for the one the Job would mount or fetch."""
        local = {
            naming.variant_service_url(self.md.name, name, self.md.namespace): url
            for name, url in self.urls.items()
        }
        local[dataset_args(gate)[1]] = self.dataset_location(gate.dataset)
        return [local.get(arg, arg) for arg in args]

    def apply_edit(self, md: ModelDeployment) -> None:
        if not same_processes(self.md, md):
            self.say(
                "  not applied: the edit changes the variants' processes (names, models, "
                "settings or routing); restart modeldeploy run to apply it"
            )
            return
        generation = self.md.generation + 1
        # The run's uid stays: the routes' probe token derives from it.
        self.md = dataclasses.replace(md, generation=generation, uid=self.md.uid)
        self.next_look = 0.0
        self.say(f"  edit: generation {generation}, spec weights {_show(md.spec_weights)}")
        if md.rollout is None:
            # Without a rollout the spec's weights are routed at once (no status to keep).
            self.status = {}

    def write_routes(self, weights: Mapping[str, int], mirror: Shadow | None) -> None:
        routes = render_routes_config(self.md, weights, self.urls, mirror)
        staged = self.routes_path.with_name(self.routes_path.name + ".new")
        staged.write_text(json.dumps(routes, indent=2) + "\n")
        staged.replace(self.routes_path)
        self.weights, self.mirror = dict(weights), mirror
        shadow = f", {mirror.percent}% mirrored to {mirror.variant}" if mirror else ""
        self.say(f"  routes: {_show(tuple(weights.items()))}{shadow}")


def _show(weights: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights)
