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
import logging
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
from modeldeploy_operator.kube import ApiError, KubeApi, RejectedError, TransientApiError
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
RETRY_MAX_S = 300.0
RESYNC_S = 60.0
FINISHED = ("Succeeded", "Failed")
BatchKey = tuple[str, str]  # (namespace, name)
log = logging.getLogger("modeldeploy_operator")


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
    """Register the BatchPrediction handlers in `registry`, configured by `config`.

    Watch-event handlers and timers of our own, as for ModelDeployments: kopf then puts no
    finalizer on BatchPredictions, so deleting one (or uninstalling) never waits for an operator.
    """
    api_holder: list[KubeApi] = []
    locks: dict[BatchKey, asyncio.Lock] = {}
    timers: dict[BatchKey, asyncio.TimerHandle] = {}
    attempts: dict[BatchKey, int] = {}
    handled: dict[BatchKey, tuple[str, int]] = {}  # (uid, generation) last reconciled
    tasks: set[asyncio.Task[None]] = set()

    @kopf.on.startup(registry=registry)
    def configure_batch(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Only our Jobs are watched (filtered by the API server).
        settings.watching.label_selectors["batch", "v1", "jobs"] = (
            f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
        )
        api_holder.append(KubeApi.from_environment(8))

    @kopf.on.cleanup(registry=registry)
    def close_batch(**_: Any) -> None:
        for timer in timers.values():
            timer.cancel()
        timers.clear()
        for api in api_holder:
            api.close()

    def forget(key: BatchKey) -> None:
        timer = timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        attempts.pop(key, None)
        handled.pop(key, None)
        locks.pop(key, None)

    def schedule(key: BatchKey, delay: float) -> None:
        old = timers.pop(key, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            timers.pop(key, None)
            task = asyncio.get_running_loop().create_task(look(key, "resync"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        timers[key] = asyncio.get_running_loop().call_later(delay, fire)

    async def look(key: BatchKey, cause: str) -> None:
        """Reconcile `key`, post its events, and schedule the next look: the resync while it
        runs, a backoff when the API server could not be reached, none once it is finished."""
        namespace, name = key

        def work() -> BatchOutcome:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return reconcile_batch(api_holder[0], config, namespace, name, now)

        lock = locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                outcome = await asyncio.to_thread(work)
        except TransientApiError as error:
            attempt = attempts.get(key, 0)
            attempts[key] = attempt + 1
            delay = min(RETRY_DELAY_S * 2**attempt, RETRY_MAX_S)
            log.warning(
                f"[{namespace}/{name}] batch reconcile ({cause}) failed, retrying in "
                f"{delay:.0f}s: {error}"
            )
            schedule(key, delay)
            return
        except RejectedError as error:
            # Nothing changes that by waiting: the next edit of the object is looked at again.
            log.error(f"[{namespace}/{name}] batch reconcile ({cause}) refused: {error}")
            return
        attempts.pop(key, None)
        if outcome.obj is None:
            forget(key)
            return
        meta = outcome.obj["metadata"]
        handled[key] = (meta.get("uid", ""), int(meta.get("generation") or 1))
        for event in outcome.events:
            kopf.event(
                kopf.Body(cast(kopf.RawBody, outcome.obj)),
                type=event.type,
                reason=event.reason,
                message=event.message,
            )
        if outcome.status.get("phase") in FINISHED:
            timer = timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        else:
            # While a Job runs, its pods' reports arrive with Job events; this only backs them up.
            schedule(key, RESYNC_S)

    @kopf.on.event(
        API_GROUP, API_VERSION, BATCH_PLURAL, id="watch-batch-predictions", registry=registry
    )
    async def batch_prediction_changed(
        *, type: str | None, namespace: str | None, name: str, meta: kopf.Meta, **_: Any
    ) -> None:
        assert namespace is not None  # BatchPredictions are namespaced
        key = (namespace, name)
        if type == "DELETED":
            forget(key)
            return
        finalizers = list(meta.get("finalizers") or [])
        if naming.LEGACY_FINALIZER in finalizers:
            # Earlier versions let kopf keep it here; one left behind would block deletion.
            try:
                await asyncio.to_thread(
                    api_holder[0].remove_finalizer,
                    namespace,
                    name,
                    naming.LEGACY_FINALIZER,
                    finalizers,
                    BATCH_PLURAL,
                )
            except ApiError as error:
                log.warning(
                    f"[{namespace}/{name}] could not remove {naming.LEGACY_FINALIZER}: {error}"
                )
        if meta.get("deletionTimestamp"):
            forget(key)
            return
        # Our own status writes change neither the uid nor the generation.
        seen = (meta.get("uid", ""), int(meta.get("generation") or 1))
        if type is not None and handled.get(key) == seen:
            return
        await look(key, "listed" if type is None else f"generation {seen[1]}")

    @kopf.on.event(
        "batch",
        "v1",
        "jobs",
        id="watch-batch-jobs",
        labels={naming.MANAGED_BY: naming.FIELD_MANAGER, BATCH_PREDICTION_LABEL: kopf.PRESENT},
        registry=registry,
    )
    async def batch_job_changed(
        *, type: str | None, namespace: str | None, labels: kopf.Labels, **_: Any
    ) -> None:
        # Job status (indexes done and failed, completion) moves the BatchPrediction's status.
        owner = labels.get(BATCH_PREDICTION_LABEL)
        if type is None or not owner or namespace is None:
            return
        await look((namespace, owner), f"Job {type.lower()}")
