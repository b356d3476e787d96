"""kopf handlers: watch ModelDeployments and every kind they own, and reconcile on what matters.

Every cause (a ModelDeployment created, edited or listed at startup, a child edited or deleted,
the resync timer) runs the same reconcile, one at a time per ModelDeployment. The handlers are
watch-event handlers only, so kopf puts no finalizer and no bookkeeping annotation on anything:
deletion is the garbage collector's job (every child has an ownerReference), and uninstalling in
any order cannot hang on an operator that is gone. The resync timer is ours for the same reason
(kopf's timers need a finalizer).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
from prometheus_client import CollectorRegistry, start_http_server

from modeldeploy_operator import naming
from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.kube import RESOURCES, ApiError, KubeApi, TransientApiError
from modeldeploy_operator.metrics import OperatorMetrics
from modeldeploy_operator.plan import Key, describe, plan_inputs
from modeldeploy_operator.pod_problems import pod_problem
from modeldeploy_operator.reconcile import Outcome, reconcile
from modeldeploy_operator.rollout_control import command_of
from modeldeploy_operator.rollout_sources import DirectMetrics
from modeldeploy_operator.spec import API_GROUP, API_VERSION, PLURAL

T = TypeVar("T")
MdKey = tuple[str, str]  # (namespace, name) of a ModelDeployment
RETRY_BASE_S = 1.0
RETRY_MAX_S = 300.0
# Earlier versions kept this kopf finalizer on ModelDeployments; one left there would block their
# deletion. (kopf still puts it on BatchPredictions, whose handlers use kopf's timers.)
LEGACY_FINALIZER = f"{API_GROUP}/operator"
log = logging.getLogger("modeldeploy_operator")


class Serializer:
    """Runs at most one reconcile per ModelDeployment at a time.

    Child events come in bursts; a request made while another is already waiting for its turn is
    dropped, because the waiting one will read the state as it is when it starts.
    """

    def __init__(self) -> None:
        self._locks: dict[MdKey, asyncio.Lock] = {}
        self._waiting: dict[MdKey, int] = {}

    def is_waiting(self, key: MdKey) -> bool:
        return self._waiting.get(key, 0) > 0

    async def run(self, key: MdKey, fn: Callable[[], Awaitable[T]]) -> T:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            async with lock:
                self._waiting[key] -= 1
                return await fn()
        finally:
            if not self._waiting.get(key) and not lock.locked():
                self._locks.pop(key, None)
                self._waiting.pop(key, None)


@dataclass
class Echoes:
    """What the last reconcile of one ModelDeployment wrote, so the watch can ignore its echoes.

    A child event is an echo when it carries the resourceVersion our apply returned and that
    version holds nothing the plan reads that the snapshot did not already hold (so a readiness
    change that raced with our apply is never swallowed).
    """

    versions: dict[Key, str] = field(default_factory=dict)
    deleted_uids: frozenset[str] = frozenset()
    # (uid, generation, rollout command annotation) last planned
    model_deployment: tuple[str, int, str] | None = None


class Controller:
    """The operator's state in one process: API client, serializer, timers, echoes, metrics."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.serializer = Serializer()
        self.api: KubeApi | None = None
        self.metrics = OperatorMetrics(CollectorRegistry())
        self.rollout_metrics = DirectMetrics()
        self._echoes: dict[MdKey, Echoes] = {}
        self._timers: dict[MdKey, asyncio.TimerHandle] = {}
        self._attempts: dict[MdKey, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._must_run: set[MdKey] = set()
        # What each variant pod (by uid) last said was wrong with it: only a change is news.
        self.pod_problems: dict[str, str] = {}

    def is_echo(self, key: MdKey, body: Mapping[str, Any], type_: str) -> bool:
        echoes = self._echoes.get(key)
        if echoes is None:
            return False
        meta = body.get("metadata", {})
        if type_ == "DELETED":
            return meta.get("uid") in echoes.deleted_uids
        version = echoes.versions.get((body.get("kind", ""), meta.get("name", "")))
        return version is not None and version == meta.get("resourceVersion")

    def planned(self, key: MdKey) -> tuple[str, int, str] | None:
        echoes = self._echoes.get(key)
        return echoes.model_deployment if echoes else None

    async def reconcile(
        self, key: MdKey, cause: str, event: tuple[Mapping[str, Any], str] | None = None
    ) -> None:
        """Reconcile `key` (after any reconcile of it already running), then schedule the next
        look: the resync interval, or a backoff when something may work later.

        `event` is the child event (body, type) that asked for it: when its turn comes, an event
        that turned out to be the echo of the reconcile it waited for is dropped.
        """
        if self.serializer.is_waiting(key):
            # The one waiting reads everything as it is when it starts; it must run, though,
            # even if its own cause turns out to be an echo, since this one may not be.
            self._must_run.add(key)
            return

        async def turn() -> None:
            must_run = key in self._must_run
            self._must_run.discard(key)
            if event is not None and not must_run and self.is_echo(key, *event):
                return
            try:
                outcome = await asyncio.to_thread(self._work, key)
            except TransientApiError as error:
                self.metrics.reconciles.labels("retry").inc()
                delay = self._backoff(key)
                where = f"[{key[0]}/{key[1]}]"
                log.warning(f"{where} reconcile failed, retrying in {delay:.0f}s: {error}")
                self.schedule(key, delay)
                return
            if outcome.model_deployment is None:
                self.forget(key)
                return
            # Remembered before the next reconcile of this key may start and look for echoes.
            self._remember(key, outcome)
            self._report(key, outcome, cause)
            if outcome.retry:
                self.schedule(key, self._backoff(key))
            else:
                self._attempts.pop(key, None)
                # A rollout step's window may end before the next resync.
                requeue = outcome.plan.requeue_after_s if outcome.plan else None
                self.schedule(key, min(self.config.resync_seconds, requeue or math.inf))

        await self.serializer.run(key, turn)

    def schedule(self, key: MdKey, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._resync, key)

    def forget(self, key: MdKey) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._echoes.pop(key, None)
        self._attempts.pop(key, None)
        self.rollout_metrics.forget(*key)
        self._must_run.discard(key)

    def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _resync(self, key: MdKey) -> None:
        self._timers.pop(key, None)
        task = asyncio.get_running_loop().create_task(self.reconcile(key, "resync"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _backoff(self, key: MdKey) -> float:
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        return float(min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S))

    def _work(self, key: MdKey) -> Outcome:
        assert self.api is not None  # set at startup, before any watch starts
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        started = time.monotonic()
        outcome = reconcile(self.api, self.config, key[0], key[1], now, self.rollout_metrics)
        self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        return outcome

    def _remember(self, key: MdKey, outcome: Outcome) -> None:
        versions = {
            k: str(written["metadata"]["resourceVersion"])
            for k, written in outcome.written.items()
            if plan_inputs(k[0], written) == plan_inputs(k[0], outcome.observed.get(k))
        }
        md_meta = (outcome.model_deployment or {}).get("metadata", {})
        self._echoes[key] = Echoes(
            versions=versions,
            deleted_uids=outcome.deleted_uids,
            model_deployment=(
                md_meta.get("uid", ""),
                int(md_meta.get("generation", 1)),
                command_of(md_meta.get("annotations")),
            ),
        )

    def _report(self, key: MdKey, outcome: Outcome, cause: str) -> None:
        where = f"[{key[0]}/{key[1]}]"
        refused = [f for f in outcome.failures if not f.transient]
        result = "refused" if refused else "retry" if outcome.retry else "ok"
        self.metrics.reconciles.labels(result).inc()
        for item in outcome.recreated:
            self.metrics.recreated.labels(item.observed["kind"]).inc()
        for failure in refused:
            self.metrics.refused.labels(failure.object.split("/", 1)[0]).inc()
        for failure in outcome.new_failures:
            if failure.transient:
                log.warning(f"{where} {failure.object} not applied, will retry: {failure.message}")
            else:
                log.error(f"{where} {failure.object} refused by the API server: {failure.message}")
        # An invalid spec is logged when the verdict is new, not each time it is seen again.
        if outcome.plan is not None and outcome.plan.invalid is not None and outcome.events:
            log.error(f"{where} invalid spec, nothing applied: {outcome.plan.invalid}")
        parts = [
            *([f"applied {', '.join(outcome.changed)}"] if outcome.changed else []),
            *([f"pruned {', '.join(outcome.pruned)}"] if outcome.pruned else []),
            *(
                [
                    "recreated "
                    + ", ".join(f"{describe(r.observed)} ({r.reason})" for r in outcome.recreated)
                ]
                if outcome.recreated
                else []
            ),
        ]
        generation = outcome.plan.generation if outcome.plan else 0
        if parts:
            log.info(f"{where} reconciled generation {generation} ({cause}): {'; '.join(parts)}")
        else:
            log.debug(f"{where} reconciled generation {generation} ({cause}): nothing to change")


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register the operator's handlers in `registry`, configured by `config`."""
    controller = Controller(config)
    metrics_servers: list[Any] = []
    children = [(_split(api_version), plural) for (api_version, _), plural in RESOURCES.items()]

    @kopf.on.startup(id="configure-watches-and-metrics", registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's own bookkeeping, for the handlers that still use it (BatchPredictions, see
        # batch_handlers.py; the ModelDeployment handlers here need none): annotations under our
        # prefix, since status.kopf would be pruned by the CRDs' structural schemas.
        settings.persistence.finalizer = LEGACY_FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration"
        )
        # Filter children in the API server, not in here: the operator then never lists or holds
        # the cluster's other Deployments, Services, ConfigMaps...
        for (group, version), plural in children:
            settings.watching.label_selectors[group, version, plural] = (
                f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
            )
        # The router Services' slices: the EndpointSlice controller copies a Service's labels.
        settings.watching.label_selectors["discovery.k8s.io", "v1", "endpointslices"] = (
            f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},"
            f"{naming.COMPONENT}={naming.COMPONENT_ROUTER}"
        )
        settings.watching.label_selectors["", "v1", "pods"] = (
            f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},"
            f"{naming.COMPONENT}={naming.COMPONENT_VARIANT}"
        )
        controller.api = KubeApi.from_environment()
        if config.metrics_port:
            server, _thread = start_http_server(
                config.metrics_port, config.metrics_host, registry=controller.metrics.registry
            )
            metrics_servers.append(server)

    @kopf.on.cleanup(id="stop-timers-and-clients", registry=registry)
    def close(**_: Any) -> None:
        controller.stop()
        for server in metrics_servers:
            server.shutdown()
        if controller.api is not None:
            controller.api.close()

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, id="watch-model-deployments", registry=registry)
    async def model_deployment_changed(
        *, type: str | None, namespace: str | None, name: str, meta: kopf.Meta, **_: Any
    ) -> None:
        key = (_namespaced(namespace), name)
        if type == "DELETED":
            controller.forget(key)
            return
        if LEGACY_FINALIZER in (meta.get("finalizers") or []):
            await _remove_legacy_finalizer(controller, key, meta)
        if meta.get("deletionTimestamp"):
            controller.forget(key)
            return
        # A status write of ours, or a label edit, changes neither the uid nor the generation;
        # a rollout command (an annotation) is news.
        planned = (
            meta.get("uid", ""),
            int(meta.get("generation") or 1),
            command_of(meta.get("annotations")),
        )
        if type is not None and controller.planned(key) == planned:
            return
        cause = "listed" if type is None else f"generation {planned[1]}"
        await controller.reconcile(key, cause)

    for (group, version), plural in children:
        kopf.on.event(
            group=group,
            version=version,
            plural=plural,
            id=f"watch-child-{plural}",
            labels={naming.MANAGED_BY: naming.FIELD_MANAGER},
            registry=registry,
        )(_child_handler(controller))
    kopf.on.event(
        group="discovery.k8s.io",
        version="v1",
        plural="endpointslices",
        id="watch-router-endpointslices",
        labels={naming.MANAGED_BY: naming.FIELD_MANAGER, naming.COMPONENT: naming.COMPONENT_ROUTER},
        registry=registry,
    )(_child_handler(controller))
    kopf.on.event(
        group="",
        version="v1",
        plural="pods",
        id="watch-variant-pods",
        labels={
            naming.MANAGED_BY: naming.FIELD_MANAGER,
            naming.COMPONENT: naming.COMPONENT_VARIANT,
        },
        registry=registry,
    )(_pod_handler(controller))


def _pod_handler(controller: Controller) -> Callable[..., Awaitable[None]]:
    async def variant_pod_changed(
        *,
        type: str | None,
        body: kopf.Body,
        namespace: str | None,
        labels: kopf.Labels,
        uid: str | None,
        **_: Any,
    ) -> None:
        # Pods change status often; only a problem that appears, changes or goes away is news
        # to the ModelDeployment's status (its Deployment says nothing of why until its deadline).
        md_name = labels.get(naming.MODEL_DEPLOYMENT)
        if not md_name or not uid:
            return
        before = controller.pod_problems.pop(uid, "")
        problem = "" if type == "DELETED" else pod_problem(body)
        if problem:
            controller.pod_problems[uid] = problem
        if problem != before and type is not None:
            key = (_namespaced(namespace), md_name)
            await controller.reconcile(
                key, f"pod {body.get('metadata', {}).get('name')} {type.lower()}"
            )

    return variant_pod_changed


def _child_handler(controller: Controller) -> Callable[..., Awaitable[None]]:
    async def child_changed(
        *,
        type: str | None,
        body: kopf.Body,
        namespace: str | None,
        labels: kopf.Labels,
        **_: Any,
    ) -> None:
        # A child edited, deleted or whose status moved: reconcile its owner now rather than at
        # the next resync. The initial listing needs nothing: listing the ModelDeployments
        # reconciles every one of them at startup anyway.
        md_name = labels.get(naming.MODEL_DEPLOYMENT)
        if type is None or not md_name:
            return
        key = (_namespaced(namespace), md_name)
        if controller.is_echo(key, body, type):
            return
        await controller.reconcile(key, f"{describe(body)} {type.lower()}", (body, type))

    return child_changed


async def _remove_legacy_finalizer(controller: Controller, key: MdKey, meta: kopf.Meta) -> None:
    assert controller.api is not None
    api = controller.api
    try:
        await asyncio.to_thread(
            api.remove_finalizer, key[0], key[1], LEGACY_FINALIZER, meta.get("finalizers") or []
        )
    except ApiError as error:
        log.warning(f"[{key[0]}/{key[1]}] could not remove finalizer {LEGACY_FINALIZER}: {error}")


def _split(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _namespaced(namespace: str | None) -> str:
    # ModelDeployments and their children are namespaced: kopf always passes a namespace.
    assert namespace is not None
    return namespace
