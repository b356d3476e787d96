"""kopf handlers and the controller behind them: an index kept by watches, a fair work queue,
and a bounded number of workers running the one reconcile.

Every cause (a ModelDeployment created, edited or listed at startup, a child edited or deleted,
the resync timer) queues the same reconcile, one at a time per ModelDeployment, which reads its
snapshot from the index (no LIST per reconcile) and writes only what differs. The only kopf
handler for ModelDeployments is a watch-event handler, so kopf puts no finalizer and no
bookkeeping annotation on anything: deletion is the garbage collector's job (every child has an
ownerReference), and uninstalling in any order cannot hang on an operator that is gone. The
resync timer is ours for the same reason (kopf's timers need a finalizer).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
from prometheus_client import CollectorRegistry, start_http_server

from modeldeploy_operator import naming
from modeldeploy_operator.config import OperatorConfig
from modeldeploy_operator.index import Index, MdKey, is_router_identity
from modeldeploy_operator.informer import NamespaceInformer, trim
from modeldeploy_operator.kube import WATCHED, ApiError, KubeApi, TransientApiError
from modeldeploy_operator.metrics import OperatorMetrics
from modeldeploy_operator.plan import Key, Snapshot, describe, identity_intact, plan_inputs
from modeldeploy_operator.pod_problems import pod_problem
from modeldeploy_operator.reconcile import Outcome, reconcile
from modeldeploy_operator.rollout_control import command_of
from modeldeploy_operator.rollout_sources import Sources
from modeldeploy_operator.spec import API_GROUP, API_VERSION, KIND, PLURAL
from modeldeploy_operator.workqueue import WorkQueue

RETRY_BASE_S = 1.0
RETRY_MAX_S = 300.0
# How long news of a child waits for the rest of its burst before its reconcile is queued: the
# Deployments of one ModelDeployment turn ready together, every router pod acks a new routes
# version at once, and each piece taken alone would change the routes (and ask for acks) again.
# A spec change, a resync or a relist at startup is queued at once.
CHILD_NEWS_DELAY_S = 0.25
log = logging.getLogger("modeldeploy_operator")


@dataclass
class Echoes:
    """What the last reconcile of one ModelDeployment wrote, so the watch can ignore its echoes.

    A child event is an echo when it carries the resourceVersion our apply returned and that
    version holds nothing the plan reads that the plan did not already see (in the snapshot, or
    in what the writes left when the status was planned again from it), so a readiness change
    that raced with our apply is never swallowed.
    """

    versions: dict[Key, str] = field(default_factory=dict)
    deleted_uids: frozenset[str] = frozenset()


Cause = tuple[str, tuple[Mapping[str, Any], str] | None]  # (why, the child event (body, type))


class Controller:
    """The operator's state in one process: the index and its informers, the work queue and its
    workers, timers, echoes, metrics."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.index = Index()
        self.queue: WorkQueue[MdKey] = WorkQueue()
        self.api: KubeApi | None = None
        self.metrics = OperatorMetrics(CollectorRegistry(), self.index.counts, self.queue.__len__)
        self.rollout_metrics = Sources(config.prometheus_url)
        # What each variant pod (by uid) last said was wrong with it: only a change is news.
        self.pod_problems: dict[str, str] = {}
        self._watch_api: KubeApi | None = None
        self._informers: dict[str, NamespaceInformer] = {}
        self._listed: dict[str, set[str]] = {}  # namespace -> kinds listed at least once
        self._synced: set[str] = set()  # namespaces whose every kind has been listed
        self._causes: dict[MdKey, list[Cause]] = {}
        self._echoes: dict[MdKey, Echoes] = {}
        # What of each ModelDeployment its latest reconcile planned from: _planned_of(metadata).
        self._planned: dict[MdKey, tuple[str, int, str]] = {}
        self._timers: dict[MdKey, asyncio.TimerHandle] = {}
        self._attempts: dict[MdKey, int] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="reconcile")

    def start(self, api: KubeApi, watch_api: KubeApi) -> None:
        """Start the workers (on the running loop); informers start per namespace as seen."""
        self.api, self._watch_api = api, watch_api
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work_loop()) for _ in range(self.config.workers)]

    def watches(self, namespace: str) -> bool:
        return namespace in self._informers

    def watch_namespace(self, namespace: str) -> None:
        """Keep the index of `namespace` from now on (once per namespace)."""
        if self.watches(namespace):
            return
        assert self._watch_api is not None  # set at startup, before kopf's watches start
        loop = asyncio.get_running_loop()
        informer = NamespaceInformer(self._watch_api, namespace, self, loop.call_soon_threadsafe)
        self._informers[namespace] = informer
        informer.start()

    def stop(self) -> None:
        for informer in self._informers.values():
            informer.stop()
        for worker in self._workers:
            worker.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the informer's news (index.Sink), on the event loop ---

    def replaced(self, kind: str, namespace: str, objects: Sequence[Mapping[str, Any]]) -> None:
        changed = self.index.replace(kind, namespace, objects)
        listed = self._listed.setdefault(namespace, set())
        listed.add(kind)
        if namespace in self._synced:
            for key in changed:
                self.enqueue(key, f"{kind} relisted", delay=CHILD_NEWS_DELAY_S)
        elif len(listed) == len(WATCHED):
            # Only now is every child of every ModelDeployment here known: reconciling earlier
            # would re-create what merely was not listed yet.
            self._synced.add(namespace)
            for key in self.index.model_deployments(namespace):
                self.enqueue(key, "listed")

    def changed(self, kind: str, type_: str, obj: Mapping[str, Any]) -> None:
        key = self.index.update(kind, type_, obj)
        if key is None:
            if is_router_identity(kind, obj) and (type_ == "DELETED" or not identity_intact(obj)):
                # Not our own write (that leaves it intact): every router of the namespace
                # relies on it, and the reconcile of any of its ModelDeployments repairs it.
                namespace = obj["metadata"].get("namespace", "")
                for md in self.index.model_deployments(namespace):
                    self.enqueue(md, f"{describe(obj)} {type_.lower()}", delay=CHILD_NEWS_DELAY_S)
            return
        meta = obj.get("metadata", {})
        if kind == KIND:
            if type_ == "DELETED":
                self.forget(key)
                self._release_router_identity(key[0])
                return
            # A status write of ours, or a label edit, changes neither the uid nor the
            # generation; a rollout command (an annotation) is news.
            planned = _planned_of(meta)
            if self._planned.get(key) != planned:
                self.enqueue(key, f"generation {planned[1]}")
            return
        if kind == "Pod":
            # Pods change status often; only a problem that appears, changes or goes away is
            # news to the status (its Deployment says nothing of why until its deadline).
            uid = meta.get("uid", "")
            before = self.pod_problems.pop(uid, "")
            problem = "" if type_ == "DELETED" else pod_problem(obj)
            if problem:
                self.pod_problems[uid] = problem
            if problem != before:
                self.enqueue(
                    key, f"pod {meta.get('name')} {type_.lower()}", delay=CHILD_NEWS_DELAY_S
                )
            return
        if not self.is_echo(key, obj, type_):
            cause = f"{describe(obj)} {type_.lower()}"
            self.enqueue(key, cause, (obj, type_), delay=CHILD_NEWS_DELAY_S)

    def _release_router_identity(self, namespace: str) -> None:
        """Delete the namespace's router identity once its last ModelDeployment that may run a
        router is gone (no owner does it: it is shared). One created meanwhile is another uid,
        which the delete's precondition spares, and its deletion event has it applied again."""
        unused = self.index.unused_router_identity(namespace)
        if unused and self.api is not None:
            loop = asyncio.get_running_loop()
            for obj in unused:
                loop.run_in_executor(self._executor, self._delete_quietly, obj)

    def _delete_quietly(self, obj: Mapping[str, Any]) -> None:
        assert self.api is not None
        try:
            self.api.delete(obj)
        except ApiError as error:  # the next deletion in the namespace tries again
            log.warning(f"{describe(obj)} in {obj['metadata'].get('namespace')}: {error}")

    # --- the queue ---

    def enqueue(
        self,
        key: MdKey,
        cause: str,
        event: tuple[Mapping[str, Any], str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Reconcile `key` when a worker is free (after any reconcile of it already running),
        and not before `delay` seconds from now.

        `event` is the child event that asked for it: if every cause turns out, at its turn, to
        be the echo of the reconcile it waited for, the turn is skipped.
        """
        if key[0] not in self._synced:
            return  # it is reconciled once its namespace is listed
        self._causes.setdefault(key, []).append((cause, event))
        self.queue.add(key, delay)

    async def _work_loop(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._turn(key)
            except Exception:  # one failed turn must not stop a worker
                log.exception(f"[{key[0]}/{key[1]}] reconcile crashed, retrying")
                self.schedule(key, self._backoff(key))
            finally:
                self.queue.done(key)

    async def _turn(self, key: MdKey) -> None:
        causes = self._causes.pop(key, [])
        if causes and all(e is not None and self.is_echo(key, *e) for _, e in causes):
            return
        snapshot = self.index.snapshot(key)
        meta = snapshot.model_deployment["metadata"] if snapshot else {}
        if naming.LEGACY_FINALIZER in (meta.get("finalizers") or []):
            await self._remove_legacy_finalizer(key, meta.get("finalizers") or [])
        if snapshot is None or meta.get("deletionTimestamp"):
            # Deletion is the garbage collector's job: every child has an ownerReference.
            self.forget(key)
            return
        cause = causes[0][0] if causes else "resync"
        if len(causes) > 1:
            cause += f" and {len(causes) - 1} more"
        # Set before the reconcile runs: the watch may bring its status write before it ends.
        self._planned[key] = _planned_of(meta)
        loop = asyncio.get_running_loop()
        try:
            outcome = await loop.run_in_executor(self._executor, self._work, snapshot)
        except TransientApiError as error:
            self.metrics.reconciles.labels("retry").inc()
            delay = self._backoff(key)
            where = f"[{key[0]}/{key[1]}]"
            log.warning(f"{where} reconcile failed, retrying in {delay:.0f}s: {error}")
            self.schedule(key, delay)
            return
        # What this reconcile wrote is what the next one must see, even before the watch brings
        # it: a stale Deployment would make the status call a new spec rolled out, and a stale
        # status would post the same transition's event twice.
        for written in (*outcome.written.values(), outcome.status_written):
            if written is not None:
                kind = str(written.get("kind", ""))
                self.index.update(kind, "MODIFIED", trim(written, kind))
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

    async def _remove_legacy_finalizer(self, key: MdKey, finalizers: list[str]) -> None:
        assert self.api is not None
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor,
                self.api.remove_finalizer,
                key[0],
                key[1],
                naming.LEGACY_FINALIZER,
                finalizers,
            )
        except ApiError as error:
            where = f"[{key[0]}/{key[1]}]"
            log.warning(f"{where} could not remove finalizer {naming.LEGACY_FINALIZER}: {error}")

    def is_echo(self, key: MdKey, body: Mapping[str, Any], type_: str) -> bool:
        echoes = self._echoes.get(key)
        if echoes is None:
            return False
        meta = body.get("metadata", {})
        if type_ == "DELETED":
            return meta.get("uid") in echoes.deleted_uids
        version = echoes.versions.get((body.get("kind", ""), meta.get("name", "")))
        return version is not None and version == meta.get("resourceVersion")

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
        self._planned.pop(key, None)
        self._attempts.pop(key, None)
        self._causes.pop(key, None)
        self.rollout_metrics.forget(*key)

    def _resync(self, key: MdKey) -> None:
        self._timers.pop(key, None)
        self.enqueue(key, "resync")

    def _backoff(self, key: MdKey) -> float:
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        return float(min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S))

    def _work(self, snapshot: Snapshot) -> Outcome:
        assert self.api is not None  # set at startup, before any watch starts
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        started = time.monotonic()
        outcome = reconcile(self.api, self.config, snapshot, now, self.rollout_metrics)
        self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        return outcome

    def _remember(self, key: MdKey, outcome: Outcome) -> None:
        versions = {
            k: str(written["metadata"]["resourceVersion"])
            for k, written in outcome.written.items()
            if plan_inputs(k[0], written) == plan_inputs(k[0], outcome.planned_from.get(k))
        }
        self._echoes[key] = Echoes(versions=versions, deleted_uids=outcome.deleted_uids)

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


def _planned_of(meta: Mapping[str, Any]) -> tuple[str, int, str]:
    """What of a ModelDeployment's metadata a reconcile plans from: its uid, its generation and
    its rollout command (an annotation); a change of anything else in it is no news."""
    return (
        meta.get("uid", ""),
        int(meta.get("generation") or 1),
        command_of(meta.get("annotations")),
    )


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Register the operator's handlers in `registry`, configured by `config`."""
    controller = Controller(config)
    metrics_servers: list[Any] = []
    clients: list[KubeApi] = []

    @kopf.on.startup(id="configure-watches-and-metrics", registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # The watches hold their connections for minutes: a client of their own, so the
        # reconcile workers' pool is never short of one.
        clients.extend([KubeApi.from_environment(config.workers + 4), KubeApi.from_environment(64)])
        controller.start(*clients)
        if config.metrics_port:
            server, _thread = start_http_server(
                config.metrics_port, config.metrics_host, registry=controller.metrics.registry
            )
            metrics_servers.append(server)

    @kopf.on.cleanup(id="stop-workers-watches-and-clients", registry=registry)
    def close(**_: Any) -> None:
        controller.stop()
        for server in metrics_servers:
            server.shutdown()
        for api in clients:
            api.close()

    # kopf watches the ModelDeployments in the namespaces it was told to serve; the index of each
    # namespace (ModelDeployments, their children, the router slices) is kept by our informer
    # from the first ModelDeployment seen there, and every reconcile is triggered from it. The
    # filter keeps kopf from invoking (and logging at INFO) this handler for every later event.
    @kopf.on.event(
        API_GROUP,
        API_VERSION,
        PLURAL,
        id="discover-namespaces",
        registry=registry,
        when=lambda namespace, **_: not controller.watches(namespace),
    )
    async def model_deployment_seen(*, namespace: str | None, **_: Any) -> None:
        # ModelDeployments are namespaced: kopf always passes a namespace.
        assert namespace is not None
        controller.watch_namespace(namespace)
