"""Watches that keep the index (index.py) current: every kind in `kube.WATCHED`, per namespace.

Informer semantics, as client-go's reflector: list, then watch from the list's resourceVersion;
a watch the server ends on time is resumed from the last version seen; any error (the API server
restarted, 410 Gone, a dropped connection) lists again, and that relist replaces what the index
held for the kind, so an object deleted while no watch ran does not stay behind.

The `kubernetes` client blocks, so each watch has its own daemon thread; everything it sees is
handed to the event loop with `deliver` (loop.call_soon_threadsafe), where the index lives.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from modeldeploy_operator.kube import WATCHED, ApiError, KubeApi

WATCH_TIMEOUT_S = 240
RETRY_MAX_S = 30.0
UNSERVED_RETRY_S = 60.0
# What is kept of a pod (trim): what pod_problems, the gate verdicts and the index read.
POD_METADATA_KEPT = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp")
POD_STATUS_KEPT = ("conditions", "initContainerStatuses", "containerStatuses")
POD_CONDITION_KEPT = ("type", "status", "reason", "message")
CONTAINER_STATUS_KEPT = ("name", "state", "lastState", "restartCount")
log = logging.getLogger("modeldeploy_operator")


class Sink(Protocol):
    """Where the informer's news goes; every method is called on the event loop."""

    def replaced(self, kind: str, namespace: str, objects: Sequence[Mapping[str, Any]]) -> None: ...

    def changed(self, kind: str, type_: str, obj: Mapping[str, Any]) -> None: ...


class NamespaceInformer:
    """One list+watch thread per watched kind in one namespace."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        sink: Sink,
        deliver: Callable[[Callable[[], None]], Any],
    ) -> None:
        self.namespace = namespace
        self._api = api
        self._sink = sink
        self._deliver = deliver
        self._stopped = threading.Event()

    def start(self) -> None:
        for watched in WATCHED:
            threading.Thread(
                target=self._run,
                args=watched,
                name=f"watch {watched[1]} in {self.namespace}",
                daemon=True,
            ).start()

    def stop(self) -> None:
        """Stop at the end of the current watch (the threads are daemons: exit does not wait)."""
        self._stopped.set()

    def _run(self, api_version: str, plural: str, kind: str, selector: str) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                failures = self._list_and_watch(api_version, plural, kind, selector, failures)
            except Exception as error:  # a thread that dies would leave its kind stale for good
                failures += 1
                log.exception(f"watching {plural} in {self.namespace} failed; listing again")
                self._pause(f"watch {plural} in {self.namespace}", error, failures)

    def _list_and_watch(
        self, api_version: str, plural: str, kind: str, selector: str, failures: int
    ) -> int:
        """One list, then watches until one fails; the count of failures in a row."""
        while not self._stopped.is_set():
            try:
                objects, version = self._api.list_objects(
                    api_version, plural, kind, self.namespace, selector, partial(trim, kind=kind)
                )
            except ApiError as error:
                if error.status == 404:
                    # Not served (HTTPRoute without the Gateway API CRDs): nothing of it exists.
                    self._replace(kind, [])
                    self._stopped.wait(UNSERVED_RETRY_S)
                    continue
                failures += 1
                # Until every kind is listed, this namespace is not reconciled: say why.
                log.warning(f"cannot list {plural} in {self.namespace}: {error}")
                self._pause(f"list {plural} in {self.namespace}", error, failures)
                continue
            failures = 0
            self._replace(kind, objects)
            try:
                while not self._stopped.is_set():
                    for type_, obj in self._api.watch_objects(
                        api_version, plural, self.namespace, selector, version, WATCH_TIMEOUT_S
                    ):
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if type_ in ("ADDED", "MODIFIED", "DELETED"):
                            self._change(kind, type_, trim(obj, kind))
            except ApiError as error:
                # Relist: events may have been missed (410 Gone says so; a restarted API
                # server may not say it).
                failures += 1
                self._pause(f"watch {plural} in {self.namespace}", error, failures)
        return failures

    def _pause(self, what: str, error: Exception, failures: int) -> None:
        delay = min(RETRY_MAX_S, 0.5 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
        log.debug(f"{what} failed, listing again in {delay:.1f}s: {error}")
        self._stopped.wait(delay)

    def _replace(self, kind: str, objects: list[dict[str, Any]]) -> None:
        self._deliver(lambda: self._sink.replaced(kind, self.namespace, objects))

    def _change(self, kind: str, type_: str, obj: Mapping[str, Any]) -> None:
        self._deliver(lambda: self._sink.changed(kind, type_, obj))


def trim(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """What the operator keeps of a watched object: all of it but its managedFields (nothing reads
    them and they are most of its size), and of a pod only what is read of it. Pods are the most
    numerous objects watched (one per replica) and the largest: a spec with everything the API
    server defaults, and a kubelet's status; a fifth of a pod is left."""
    if kind == "Pod":
        return {
            "apiVersion": obj.get("apiVersion", "v1"),
            "kind": kind,
            "metadata": _pick(obj.get("metadata") or {}, POD_METADATA_KEPT),
            "status": _pod_status(obj.get("status") or {}),
        }
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def _pod_status(status: Mapping[str, Any]) -> dict[str, Any]:
    kept = _pick(status, POD_STATUS_KEPT)
    if "conditions" in kept:
        kept["conditions"] = [_pick(c, POD_CONDITION_KEPT) for c in kept["conditions"]]
    for key in ("initContainerStatuses", "containerStatuses"):
        if key in kept:
            kept[key] = [_pick(c, CONTAINER_STATUS_KEPT) for c in kept[key]]
    return kept


def _pick(obj: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: obj[k] for k in keys if k in obj}
