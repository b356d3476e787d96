"""`modeldeploy run`'s rollout: the operator's plan (rollout_control.plan_md_rollout) run on this
machine, judged on the local router's own /metrics (the direct source), its weights written into
the router's routes file.

Each edit of the YAML file that changes only weights, gates or `spec.rollout` is a new generation,
rolled out from the traffic flowing, as in a cluster; an edit that would need other processes
(variants added or removed, another model) is reported and needs a restart. Gates are not run
locally: a gated candidate waits in Gating.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modeldeploy_operator.render import render_routes_config
from modeldeploy_operator.rollout import VariantMetrics, timestamp
from modeldeploy_operator.rollout_control import plan_md_rollout, window_query
from modeldeploy_operator.rollout_sources import DirectMetrics
from modeldeploy_operator.spec import ModelDeployment

Say = Callable[[str], None]
# The file's new ModelDeployment, why it cannot be read, or None while it has not changed.
Reload = Callable[[], ModelDeployment | str | None]
IDLE_LOOK_S = (
    5.0  # how often a rollout that needs no look (promoted, no spec.rollout) is re-planned
)


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
    ) -> None:
        self.md = md
        self.urls = dict(urls)
        self.router_metrics = f"{router_url}/metrics"
        self.routes_path = routes_path
        self.say = say
        self.reload = reload
        self.status: dict[str, Any] = {}
        self.weights = dict(md.spec_weights)
        self.source = DirectMetrics()
        self.next_look = 0.0

    def tick(self, now: datetime | None = None) -> None:
        """Pick up an edited file, and plan when the rollout wants a look."""
        changed = self.reload() if self.reload is not None else None
        if isinstance(changed, str):
            self.say(f"  not applied: {changed}")
        elif changed is not None:
            self.apply_edit(changed)
        if time.monotonic() < self.next_look:
            return
        stamp = timestamp(now or datetime.now(UTC))
        # What flows now, as a cluster's status says it (the rollout's weights take precedence).
        rows = [{"name": name, "effectiveWeight": w} for name, w in self.weights.items()]
        previous = {**self.status, "variants": rows}
        query = window_query(self.md, previous, (), stamp)
        metrics: Mapping[str, VariantMetrics] = {}
        if query is not None:
            metrics = self.source.window(dataclasses.replace(query, targets=(self.router_metrics,)))
        outcome = plan_md_rollout(self.md, previous, metrics, {}, stamp)
        weights = dict(outcome.weights) if outcome is not None else dict(self.md.spec_weights)
        for event in outcome.events if outcome is not None else ():
            self.say(f"  rollout {event.reason.removeprefix('Rollout')}: {event.message}")
        if outcome is not None:
            self.status = {"rollout": outcome.status}
        if weights != self.weights:
            self.write_routes(weights)
        requeue = outcome.requeue_after_s if outcome is not None else None
        self.next_look = time.monotonic() + (requeue or IDLE_LOOK_S)

    def apply_edit(self, md: ModelDeployment) -> None:
        if not same_processes(self.md, md):
            self.say(
                "  not applied: the edit changes the variants' processes (names, models, "
                "settings or routing); restart modeldeploy run to apply it"
            )
            return
        generation = self.md.generation + 1
        self.md = dataclasses.replace(md, generation=generation)
        self.next_look = 0.0
        self.say(f"  edit: generation {generation}, spec weights {_show(md.spec_weights)}")
        if md.rollout is None:
            # Without a rollout the spec's weights are routed at once (no status to keep).
            self.status = {}

    def write_routes(self, weights: Mapping[str, int]) -> None:
        routes = render_routes_config(self.md, weights, self.urls)
        staged = self.routes_path.with_name(self.routes_path.name + ".new")
        staged.write_text(json.dumps(routes, indent=2) + "\n")
        staged.replace(self.routes_path)
        self.weights = dict(weights)
        self.say(f"  routes: {_show(tuple(weights.items()))}")


def _show(weights: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights)
