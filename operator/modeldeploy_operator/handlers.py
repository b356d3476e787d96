"""kopf handlers: every cause runs the same reconcile, one at a time per ModelDeployment."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import kopf

from modeldeploy_operator import naming
from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.kube import KubeApi, TransientApiError
from modeldeploy_operator.reconcile import Outcome, reconcile
from modeldeploy_operator.spec import API_GROUP, API_VERSION, PLURAL

T = TypeVar("T")
Key = tuple[str, str]
RETRY_DELAY_S = 10.0


class Serializer:
    """Runs at most one reconcile per ModelDeployment at a time.

    Child events come in bursts; a request made while another is already waiting for its turn is
    dropped, because the waiting one will read the state as it is when it starts.
    """

    def __init__(self) -> None:
        self._locks: dict[Key, asyncio.Lock] = {}
        self._waiting: dict[Key, int] = {}

    def is_waiting(self, key: Key) -> bool:
        return self._waiting.get(key, 0) > 0

    async def run(self, key: Key, fn: Callable[[], Awaitable[T]]) -> T:
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


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register the operator's handlers in `registry`, configured by `config`."""
    serializer = Serializer()
    api_holder: list[KubeApi] = []
    # resourceVersion of each child Deployment as our last apply left it, to ignore the echoes.
    own_writes: dict[Key, str] = {}

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's own bookkeeping goes in annotations under our prefix: status.kopf would be pruned
        # by the CRD's structural schema, and these are written only when the spec changes (the
        # diff base) or while a handler retries (progress), never on the children.
        settings.persistence.finalizer = f"{API_GROUP}/operator"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration"
        )
        # Events for every handler success would bury the ones we post on real transitions.
        settings.posting.level = logging.WARNING
        # Filter child Deployments in the API server, not in here: the operator then never
        # lists or holds the cluster's other Deployments.
        settings.watching.label_selectors["apps", "v1", "deployments"] = (
            f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
        )
        api_holder.append(KubeApi.from_environment())

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        for api in api_holder:
            api.close()

    async def reconcile_now(namespace: str, name: str, logger: kopf.Logger) -> Outcome:
        def work() -> Outcome:
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return reconcile(api_holder[0], config, namespace, name, now)

        outcome = await serializer.run((namespace, name), lambda: asyncio.to_thread(work))
        for obj in outcome.applied:
            if obj.get("kind") == "Deployment":
                meta = obj["metadata"]
                own_writes[(namespace, meta["name"])] = meta["resourceVersion"]
        _report(outcome, logger)
        return outcome

    @kopf.on.resume(API_GROUP, API_VERSION, PLURAL, id="reconcile", registry=registry)
    @kopf.on.create(API_GROUP, API_VERSION, PLURAL, id="reconcile", registry=registry)
    @kopf.on.update(API_GROUP, API_VERSION, PLURAL, id="reconcile", registry=registry)
    async def reconcile_model_deployment(
        *, namespace: str | None, name: str, logger: kopf.Logger, retry: int, **_: Any
    ) -> None:
        try:
            outcome = await reconcile_now(_namespaced(namespace), name, logger)
        except TransientApiError as error:
            raise kopf.TemporaryError(
                str(error), delay=min(RETRY_DELAY_S * 2**retry, 300)
            ) from error
        if outcome.failure is not None:
            # Status says Degraded; retrying the same generation would fail the same way.
            raise kopf.PermanentError(outcome.failure)

    @kopf.timer(
        API_GROUP,
        API_VERSION,
        PLURAL,
        id="resync",
        interval=config.resync_seconds,
        initial_delay=config.resync_seconds,
        registry=registry,
    )
    async def resync(*, namespace: str | None, name: str, logger: kopf.Logger, **_: Any) -> None:
        # Drift correction: restores edited or deleted children even without an event on them.
        try:
            await reconcile_now(_namespaced(namespace), name, logger)
        except TransientApiError as error:
            raise kopf.TemporaryError(str(error), delay=RETRY_DELAY_S) from error

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        labels={naming.MANAGED_BY: naming.FIELD_MANAGER},
        registry=registry,
    )
    async def child_deployment_changed(
        *,
        type: str | None,
        namespace: str | None,
        name: str,
        labels: kopf.Labels,
        meta: kopf.Meta,
        logger: kopf.Logger,
        **_: Any,
    ) -> None:
        # Readiness moves traffic and status: reconcile the owner now rather than at the next
        # resync. Event handlers are not retried, so errors only log; the resync timer retries.
        md_name = labels.get(naming.MODEL_DEPLOYMENT)
        key = (_namespaced(namespace), md_name or "")
        child = (key[0], name)
        if type == "DELETED":
            own_writes.pop(child, None)
        elif type is None or own_writes.get(child) == meta.get("resourceVersion"):
            # The initial listing (resume handlers reconcile everything at startup anyway), or
            # the echo of our own apply: nothing new to react to.
            return
        if not md_name or serializer.is_waiting(key):
            return
        try:
            await reconcile_now(*key, logger)
        except TransientApiError as error:
            logger.warning(f"refreshing {namespace}/{md_name} failed, will retry: {error}")


def _report(outcome: Outcome, logger: kopf.Logger) -> None:
    obj = outcome.model_deployment
    if obj is None:
        return
    for stale in outcome.pruned:
        logger.info(f"pruned {stale}")
    for event in outcome.events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, obj)),
            type=event.type,
            reason=event.reason,
            message=event.message,
        )


def _namespaced(namespace: str | None) -> str:
    # ModelDeployments and Deployments are namespaced: kopf always passes a namespace for them.
    assert namespace is not None
    return namespace
