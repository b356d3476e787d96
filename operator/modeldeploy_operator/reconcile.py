"""The one reconcile: read the ModelDeployment, parse, render, apply, prune, observe, write status.

It never looks at what changed, only at what is, so running it twice changes nothing. It blocks
(every API call does); the kopf handlers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.kube import ApiError, KubeApi, RejectedError, TransientApiError
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import InvalidSpecError, parse_model_deployment
from modeldeploy_operator.status import (
    Event,
    compute_events,
    compute_failed_status,
    compute_status,
    ready_variants,
)


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did, for the kopf layer to report."""

    model_deployment: Mapping[str, Any] | None  # None: it no longer exists (or is being deleted)
    events: list[Event] = field(default_factory=list)
    failure: str | None = None  # set when this generation cannot be reconciled as it stands
    applied: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)


def reconcile(api: KubeApi, config: OperatorConfig, namespace: str, name: str, now: str) -> Outcome:
    """Bring one ModelDeployment's children and status in line with its spec."""
    obj = api.get_model_deployment(namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        # Deletion is the garbage collector's job: every child has an ownerReference to it.
        return Outcome(model_deployment=None)
    previous = obj.get("status")
    generation = obj["metadata"].get("generation", 1)
    try:
        md = parse_model_deployment(obj)
    except InvalidSpecError as error:
        return _fail(api, obj, generation, "InvalidSpec", str(error), now)

    owned = [o for o in api.list_owned(namespace, name) if _owned_by(o, md.uid)]
    observed = {o["metadata"]["name"]: o for o in owned if o["kind"] == "Deployment"}
    desired = render_objects(
        md, server_image=config.server_image, ready_variants=ready_variants(md, observed)
    )
    wanted = {_key(o) for o in desired}
    applied = []
    pruned = []
    try:
        for manifest in desired:
            applied.append(api.apply(manifest))
        for stale in owned:
            if _key(stale) not in wanted:
                api.delete(stale)
                pruned.append(f"{stale['kind']}/{stale['metadata']['name']}")
    except RejectedError as error:
        return _fail(api, obj, generation, "ApplyRejected", str(error), now)
    except TransientApiError as error:
        # Say so in the status while kopf retries (it cannot be said if the API server is down).
        with contextlib.suppress(ApiError):
            _fail(api, obj, generation, "ApplyFailed", f"{error} (retrying)", now)
        raise

    deployments = {
        a["metadata"]["name"]: a
        for a, d in zip(applied, desired, strict=True)
        if d["kind"] == "Deployment"
    }
    status = compute_status(md, deployments, previous=previous, now=now)
    if status != previous:
        api.apply_status(namespace, name, status)
    return Outcome(
        model_deployment=obj,
        events=compute_events(previous, status),
        applied=applied,
        pruned=pruned,
    )


def _fail(
    api: KubeApi, obj: Mapping[str, Any], generation: int, reason: str, message: str, now: str
) -> Outcome:
    previous = obj.get("status")
    status = compute_failed_status(generation, reason, message, previous=previous, now=now)
    if status != previous:
        api.apply_status(obj["metadata"]["namespace"], obj["metadata"]["name"], status)
    return Outcome(model_deployment=obj, events=compute_events(previous, status), failure=message)


def _owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    """Ours to prune only if this very ModelDeployment (not a namesake) is its controller."""
    return any(
        ref.get("uid") == uid and ref.get("controller")
        for ref in obj["metadata"].get("ownerReferences", [])
    )


def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]
