"""The one reconcile: from one snapshot (the index's, index.py), plan (pure, plan.py), act, then
write the status.

It never looks at what changed, only at what is, so running it twice changes nothing. It blocks
(every API call does); the kopf handlers run it in a worker thread. Every child is applied on its
own: one the API server refuses is reported and never stops the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.kube import ApiError, KubeApi, RejectedError, TransientApiError
from modeldeploy_operator.plan import (
    Failure,
    Key,
    Plan,
    Recreate,
    Snapshot,
    describe,
    key,
    plan,
    settle,
)
from modeldeploy_operator.readiness import route_table_key
from modeldeploy_operator.rollout_control import window_query
from modeldeploy_operator.rollout_metrics import MetricsSource
from modeldeploy_operator.spec import InvalidSpecError, parse_model_deployment
from modeldeploy_operator.status import Event


@dataclass(frozen=True)
class Outcome:
    """What one reconcile saw and did, for the kopf layer to log and to recognise its echoes."""

    plan: Plan | None = None
    events: tuple[Event, ...] = ()
    failures: tuple[Failure, ...] = ()
    new_failures: tuple[Failure, ...] = ()
    # The children as this reconcile's writes left them, by (kind, name).
    written: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    # The children the final plan (and the status written) was computed from: a watch event of
    # a write that brings nothing the plan reads beyond these is this reconcile's echo.
    planned_from: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    changed: tuple[str, ...] = ()  # "Kind/name" of applies that changed or created something
    pruned: tuple[str, ...] = ()
    recreated: tuple[Recreate, ...] = ()
    deleted_uids: frozenset[str] = frozenset()
    # The ModelDeployment as our status write left it (None: no status write was needed).
    status_written: Mapping[str, Any] | None = None

    @property
    def retry(self) -> bool:
        """Something failed that may work later without any change from anyone."""
        return any(f.transient for f in self.failures)


def observe_metrics(
    snapshot: Snapshot, now: str, metrics_source: MetricsSource | None = None
) -> Snapshot:
    """`snapshot` with, when a rollout is under way, its step window's metrics from
    `metrics_source` (the routers' own /metrics: blocking calls, made in the worker thread)."""
    if metrics_source is None:
        return snapshot
    obj = snapshot.model_deployment
    with contextlib.suppress(InvalidSpecError):  # the plan says why
        md = parse_model_deployment(obj)
        query = window_query(md, obj.get("status"), snapshot.endpoint_slices, now)
        if query is not None:
            metrics = metrics_source.window(query)
            counters = metrics_source.read_at_now(query)
            return dataclasses.replace(snapshot, metrics=metrics, counters=counters)
    return snapshot


def act(api: KubeApi, planned: Plan, observed: Mapping[Key, Mapping[str, Any]]) -> Outcome:
    """Apply, recreate and prune every child on its own; collect what the API server refused."""
    failures: list[Failure] = []
    written: dict[Key, Mapping[str, Any]] = {}
    deleted: set[str] = set()
    recreated: list[Recreate] = []
    pruned: list[str] = []

    def attempt(obj: Mapping[str, Any], call: Any) -> bool:
        try:
            call()
        except RejectedError as error:
            failures.append(Failure(describe(obj), str(error)))
            return False
        except TransientApiError as error:
            failures.append(Failure(describe(obj), str(error), transient=True))
            return False
        return True

    for item in planned.recreate:
        if attempt(item.observed, lambda item=item: api.delete(item.observed)):
            deleted.add(item.observed["metadata"]["uid"])
            recreated.append(item)
    for manifest in planned.apply:

        def apply(manifest: Mapping[str, Any] = manifest) -> None:
            written[key(manifest)] = api.apply(dict(manifest))

        attempt(manifest, apply)
    for stale in planned.prune:
        if attempt(stale, lambda stale=stale: api.delete(stale)):
            deleted.add(stale["metadata"]["uid"])
            pruned.append(describe(stale))
    routes_key = route_table_key(planned.name)
    routes = written.get(routes_key, observed.get(routes_key))
    if (
        planned.prune_acks
        and routes is not None
        and attempt(routes, lambda: api.remove_acks(routes, planned.prune_acks))
    ):
        pruned.extend(f"ack of pod {pod}" for pod in planned.prune_acks)
    return Outcome(
        failures=tuple(failures),
        written=written,
        pruned=tuple(pruned),
        recreated=tuple(recreated),
        deleted_uids=frozenset(deleted),
    )


def _spec_changed(
    observed: Mapping[Key, Mapping[str, Any]], written: Mapping[Key, Mapping[str, Any]]
) -> bool:
    """Whether a write moved some observed Deployment to a new generation (a spec the controller
    must roll out)."""
    return any(
        k[0] == "Deployment"
        and obj.get("metadata", {}).get("generation")
        != observed.get(k, {}).get("metadata", {}).get("generation")
        for k, obj in written.items()
    )


def reconcile(
    api: KubeApi,
    config: OperatorConfig,
    snapshot: Snapshot,
    now: str,
    metrics_source: MetricsSource | None = None,
) -> Outcome:
    """Bring one ModelDeployment's children and status in line with its spec, from `snapshot`
    (what the index holds: reading it costs the API server nothing).

    Raises TransientApiError when the status cannot be written.
    """
    snapshot = observe_metrics(snapshot, now, metrics_source)
    obj = snapshot.model_deployment
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    observed = {key(o): o for o in snapshot.children}
    planned = plan(snapshot, server_image=config.server_image, now=now)
    done = act(api, planned, observed)
    planned_from: Mapping[Key, Mapping[str, Any]] = observed
    if _spec_changed(observed, done.written):
        # A Deployment whose spec just changed has not rolled out yet, whatever the snapshot said:
        # plan the status again from what the writes left, or it would claim the new generation
        # complete (Progressing=False) before the Deployment controller even saw it.
        after = (
            *(o for o in snapshot.children if key(o) not in done.written),
            *done.written.values(),
        )
        replanned = plan(
            dataclasses.replace(snapshot, children=after), server_image=config.server_image, now=now
        )
        planned = dataclasses.replace(planned, status=replanned.status, events=replanned.events)
        if not (replanned.apply or replanned.recreate or replanned.prune):
            # Planned from what the writes left, nothing more is wanted: their own watch events
            # (a created Deployment's first of all) are echoes, not news.
            planned_from = {key(o): o for o in after}
    settled = settle(planned, done.failures)
    status_written = None
    if settled.status != obj.get("status"):
        status_written = api.apply_status(namespace, name, settled.status)
    recreated = (
        Event("Normal", "Recreated", f"recreated {describe(r.observed)}: {r.reason}")
        for r in done.recreated
    )
    for event in (*settled.events, *recreated):
        # Best effort: the status already holds the truth, and the next transition posts again.
        with contextlib.suppress(ApiError):
            api.create_event(obj, event, now)
    changed = tuple(
        describe(obj_)
        for k, obj_ in done.written.items()
        if observed.get(k, {}).get("metadata", {}).get("resourceVersion")
        != obj_.get("metadata", {}).get("resourceVersion")
    )
    return dataclasses.replace(
        done,
        plan=planned,
        events=settled.events,
        new_failures=settled.new_failures,
        planned_from=planned_from,
        changed=changed,
        status_written=status_written,
    )
