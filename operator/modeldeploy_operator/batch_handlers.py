"""kopf handlers of BatchPredictions: one reconcile for every cause, and Job events to prompt it.

Observe (the BatchPrediction, its Job, the Job's pods), decide (pure: batch_render and
batch_status), act (create the Job once, write the whole status, post events on transitions).
The Job is applied only while it does not exist: its pod template is immutable and the spec it
comes from is too (CEL), so there is never anything to change; a model given by a ModelDeployment
variant is resolved once, when the Job is created, and the Job's annotations keep it.
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from typing import Any, cast

import kopf

from modeldeploy_operator import naming
from modeldeploy_operator.batch_render import (
    BATCH_PREDICTION_LABEL,
    UnresolvedModel,
    batch_selector,
    render_batch_job,
    resolve_model,
)
from modeldeploy_operator.batch_status import compute_batch_events, compute_batch_status
from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.kube import KubeApi, RejectedError, TransientApiError
from modeldeploy_operator.spec import (
    API_GROUP,
    API_VERSION,
    BATCH_PLURAL,
    InvalidSpecError,
    parse_batch_prediction,
    parse_model_deployment,
)
from modeldeploy_operator.status import Event

RETRY_DELAY_S = 10.0
# While a Job runs, its pods' reports arrive with Job events; the timer only backs them up.
RESYNC_S = 60.0
FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class BatchOutcome:
    """What one reconcile did: the object as read, the status written and the events to post."""

    obj: dict[str, Any] | None
    status: dict[str, Any]
    events: list[Event]


def reconcile_batch(
    api: KubeApi, config: OperatorConfig, namespace: str, name: str, now: str
) -> BatchOutcome:
    """Observe, decide, act for one BatchPrediction; blocking (run it off the event loop)."""
    obj = api.get_batch_prediction(namespace, name)
    if obj is None:
        return BatchOutcome(None, {}, [])
    bp = parse_batch_prediction(obj)
    previous = obj.get("status") or {}
    job = api.get_batch_job(namespace, name)
    if job is None and previous.get("phase") in FINISHED:
        # Finished, and its Job since deleted by hand (or never accepted): nothing more to do.
        return BatchOutcome(obj, previous, [])
    problem = None
    if job is None:
        try:
            md = None
            if bp.model_ref is not None:
                raw = api.get_model_deployment(namespace, bp.model_ref.name)
                md = parse_model_deployment(raw) if raw is not None else None
            model = resolve_model(bp, md)
            job = api.apply_job(render_batch_job(bp, model, server_image=config.server_image))
        except (UnresolvedModel, InvalidSpecError) as error:
            problem = ("ModelNotFound", str(error))
        except RejectedError as error:
            problem = ("JobRejected", f"the API server refused the Job: {error}")
    pods = api.list_pods(namespace, batch_selector(name)) if job is not None else []
    status = compute_batch_status(bp, job, pods, problem, previous, now)
    api.apply_batch_status(namespace, name, status)
    return BatchOutcome(obj, status, compute_batch_events(previous, status))


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register the BatchPrediction handlers in `registry`, configured by `config`."""
    api_holder: list[KubeApi] = []
    locks: dict[tuple[str, str], asyncio.Lock] = {}

    @kopf.on.startup(registry=registry)
    def configure_batch(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Only our Jobs are watched (filtered by the API server).
        settings.watching.label_selectors["batch", "v1", "jobs"] = (
            f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
        )
        api_holder.append(KubeApi.from_environment(8))

    @kopf.on.cleanup(registry=registry)
    def close_batch(**_: Any) -> None:
        for api in api_holder:
            api.close()

    async def reconcile_now(namespace: str, name: str) -> BatchOutcome:
        def work() -> BatchOutcome:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return reconcile_batch(api_holder[0], config, namespace, name, now)

        lock = locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            outcome = await asyncio.to_thread(work)
        if outcome.obj is not None:
            for event in outcome.events:
                kopf.event(
                    kopf.Body(cast(kopf.RawBody, outcome.obj)),
                    type=event.type,
                    reason=event.reason,
                    message=event.message,
                )
        return outcome

    @kopf.on.resume(API_GROUP, API_VERSION, BATCH_PLURAL, id="batch", registry=registry)
    @kopf.on.create(API_GROUP, API_VERSION, BATCH_PLURAL, id="batch", registry=registry)
    @kopf.on.update(API_GROUP, API_VERSION, BATCH_PLURAL, id="batch", registry=registry)
    async def reconcile_batch_prediction(
        *, namespace: str | None, name: str, retry: int, **_: Any
    ) -> None:
        assert namespace is not None  # BatchPredictions are namespaced
        try:
            await reconcile_now(namespace, name)
        except TransientApiError as error:
            raise kopf.TemporaryError(
                str(error), delay=min(RETRY_DELAY_S * 2**retry, 300)
            ) from error
        except RejectedError as error:
            raise kopf.PermanentError(str(error)) from error

    @kopf.timer(
        API_GROUP,
        API_VERSION,
        BATCH_PLURAL,
        id="batch-resync",
        interval=RESYNC_S,
        initial_delay=RESYNC_S,
        registry=registry,
    )
    async def resync_batch(
        *, namespace: str | None, name: str, status: kopf.Status, **_: Any
    ) -> None:
        # A finished BatchPrediction never changes again: nothing to look at.
        if status.get("phase") in FINISHED:
            return
        assert namespace is not None
        try:
            await reconcile_now(namespace, name)
        except TransientApiError as error:
            raise kopf.TemporaryError(str(error), delay=RETRY_DELAY_S) from error

    @kopf.on.event(
        "batch",
        "v1",
        "jobs",
        labels={naming.MANAGED_BY: naming.FIELD_MANAGER, BATCH_PREDICTION_LABEL: kopf.PRESENT},
        registry=registry,
    )
    async def batch_job_changed(
        *,
        type: str | None,
        namespace: str | None,
        labels: kopf.Labels,
        logger: kopf.Logger,
        **_: Any,
    ) -> None:
        # Job status (indexes done and failed, completion) moves the BatchPrediction's status.
        owner = labels.get(BATCH_PREDICTION_LABEL)
        if type is None or not owner or namespace is None:
            return
        try:
            await reconcile_now(namespace, owner)
        except (TransientApiError, RejectedError) as error:
            logger.warning(f"refreshing BatchPrediction {namespace}/{owner} failed: {error}")
