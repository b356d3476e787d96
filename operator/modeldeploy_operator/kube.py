"""The one adapter to the Kubernetes API server: server-side apply under one field manager,
pruning, and reads of ModelDeployments and their children.

Every call blocks (the `kubernetes` client is synchronous); callers run them off the event loop.
The `kubernetes` client gives the credentials, the TLS settings and the connection pool; requests
go to the pool directly, in orjson: the client's own path re-read its configuration and ran the
standard json module on every call.
Errors become two domain exceptions: `TransientApiError` (worth retrying) and `RejectedError`
(the API server refused what we sent; retrying the same thing cannot help).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import urllib3
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from modeldeploy_operator import naming
from modeldeploy_operator.contract import (
    ROUTE_TABLE_API_VERSION,
    ROUTE_TABLE_KIND,
    ROUTE_TABLE_PLURAL,
)
from modeldeploy_operator.spec import (
    BATCH_KIND,
    BATCH_PLURAL,
    KIND,
    MODEL_DEPLOYMENT_API_VERSION,
    PLURAL,
)
from modeldeploy_operator.status import Event

Manifest = dict[str, Any]

# (apiVersion, kind) -> plural, for every kind the operator renders (all namespaced).
RESOURCES: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    (ROUTE_TABLE_API_VERSION, ROUTE_TABLE_KIND): ROUTE_TABLE_PLURAL,
    # The routers' identity of each namespace (owned by no ModelDeployment).
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("batch/v1", "Job"): "jobs",  # gate Jobs (issue 12)
}
# What the informer keeps of each object it watches: our own children, their owner, the router
# Services' EndpointSlices. (group/version, plural, kind, label selector.)
WATCHED: tuple[tuple[str, str, str, str], ...] = (
    (MODEL_DEPLOYMENT_API_VERSION, PLURAL, KIND, ""),
    *(
        (api_version, plural, kind, f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}")
        for (api_version, kind), plural in RESOURCES.items()
    ),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        # The EndpointSlice controller copies the router Service's labels onto its slices.
        f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},{naming.COMPONENT}={naming.COMPONENT_ROUTER}",
    ),
    # The variant pods, for why they do not run; the gate Jobs' pods, for their verdicts.
    (
        "v1",
        "pods",
        "Pod",
        f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},"
        f"{naming.COMPONENT} in ({naming.COMPONENT_VARIANT},{naming.COMPONENT_GATE})",
    ),
)
_LIST_PAGE = 500
_TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_REQUEST_TIMEOUT_S = (5.0, 30.0)


class ApiError(Exception):
    """An API call failed; the message says which call and why."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, 0 when no response came back


class TransientApiError(ApiError):
    """Worth retrying later: throttling, conflicts, timeouts, an unreachable API server."""


class RejectedError(ApiError):
    """The API server refused the request (invalid object, forbidden, missing API)."""


class KubeApi:
    """Thin, typed calls on the API server; one instance per operator process."""

    def __init__(self, api_client: Any) -> None:
        self._client = api_client
        # Read once: the property formats the configuration's server variables on every read.
        self._host = api_client.configuration.host
        self._pool = api_client.rest_client.pool_manager

    @classmethod
    def from_environment(cls, connections: int) -> KubeApi:
        """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config;
        up to `connections` kept open for the threads that share it."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        configuration.connection_pool_maxsize = connections
        return cls(client.ApiClient(configuration))

    def close(self) -> None:
        self._client.close()

    def apply(self, obj: Manifest) -> Manifest:
        """Server-side apply `obj` as our field manager, taking over conflicting fields."""
        meta = obj["metadata"]
        path = _object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        try:
            return self._apply(path, obj)
        except RejectedError as error:
            if error.status == 404:
                # Typically gateway mode on a cluster without the Gateway API CRDs.
                raise RejectedError(
                    f"{obj['kind']} ({obj['apiVersion']}) is not served by this cluster; "
                    f"is its CRD installed? ({error})",
                    error.status,
                ) from error
            raise

    def apply_status(self, namespace: str, name: str, status: Manifest) -> Manifest:
        """Server-side apply the whole status: fields we stop setting are removed."""
        return self._apply_status(KIND, PLURAL, namespace, name, status)

    def apply_job(self, job: Manifest) -> Manifest:
        """Server-side apply a BatchPrediction's Job."""
        meta = job["metadata"]
        path = _collection_path("batch/v1", "jobs", meta["namespace"]) + f"/{meta['name']}"
        return self._apply(path, job)

    def apply_batch_status(self, namespace: str, name: str, status: Manifest) -> Manifest:
        """Server-side apply a BatchPrediction's whole status."""
        return self._apply_status(BATCH_KIND, BATCH_PLURAL, namespace, name, status)

    def _apply_status(
        self, kind: str, plural: str, namespace: str, name: str, status: Manifest
    ) -> Manifest:
        body = {
            "apiVersion": MODEL_DEPLOYMENT_API_VERSION,
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "status": status,
        }
        path = _collection_path(MODEL_DEPLOYMENT_API_VERSION, plural, namespace)
        return self._apply(f"{path}/{name}/status", body)

    def get_batch_job(self, namespace: str, name: str) -> Manifest | None:
        """The Job of a BatchPrediction (named after it), or None."""
        return self._get_or_none(_collection_path("batch/v1", "jobs", namespace) + f"/{name}")

    def get_batch_prediction(self, namespace: str, name: str) -> Manifest | None:
        path = _collection_path(MODEL_DEPLOYMENT_API_VERSION, BATCH_PLURAL, namespace)
        return self._get_or_none(f"{path}/{name}")

    def list_pods(self, namespace: str, selector: str) -> list[Manifest]:
        """Pods by label selector (a BatchPrediction's shards for their termination messages, a
        variant's to say why they do not run)."""
        listing = self._request(
            "GET", _collection_path("v1", "pods", namespace), {"labelSelector": selector}
        )
        pods: list[Manifest] = listing.get("items", [])
        return pods

    def _get_or_none(self, path: str) -> Manifest | None:
        try:
            return self._request("GET", path, {})
        except RejectedError as error:
            if error.status == 404:
                return None
            raise

    def _apply(self, path: str, body: Manifest) -> Manifest:
        # force: fields someone else changed by hand on our objects come back to us (drift).
        # fieldValidation=Ignore: the API server would otherwise parse every body a second time,
        # strictly, a sixth of its CPU per apply, for a warning about a duplicated key (a body
        # serialized from a dict has none); apply itself still refuses an undeclared field.
        return self._request(
            "PATCH",
            path,
            {"fieldManager": naming.FIELD_MANAGER, "force": "true", "fieldValidation": "Ignore"},
            body=body,
            content_type="application/apply-patch+yaml",
        )

    def get_model_deployment(self, namespace: str, name: str) -> Manifest | None:
        path = _collection_path(MODEL_DEPLOYMENT_API_VERSION, PLURAL, namespace) + f"/{name}"
        try:
            return self._request("GET", path, {})
        except RejectedError as error:
            if error.status == 404:
                return None
            raise

    def remove_finalizer(
        self,
        namespace: str,
        name: str,
        finalizer: str,
        finalizers: list[str],
        plural: str = PLURAL,
    ) -> None:
        """Remove `finalizer` from one of our objects (a ModelDeployment, or another `plural` of
        our group) whose finalizers are still `finalizers`."""
        path = _collection_path(MODEL_DEPLOYMENT_API_VERSION, plural, namespace) + f"/{name}"
        body: Any = [
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {
                "op": "replace",
                "path": "/metadata/finalizers",
                "value": [f for f in finalizers if f != finalizer],
            },
        ]
        self._request("PATCH", path, {}, body=body, content_type="application/json-patch+json")

    def list_objects(
        self,
        api_version: str,
        plural: str,
        kind: str,
        namespace: str,
        selector: str,
        transform: Callable[[Manifest], Manifest],
    ) -> tuple[list[Manifest], str]:
        """Every object of one kind in `namespace` matching `selector`, in pages, each as
        `transform` leaves it, and the list's resourceVersion (where a watch picks up).

        Transformed page by page: only one page of whole objects is held at a time, not every
        object of the kind with its managedFields (an operator restarted among 3,000
        ModelDeployments held half as much again as it keeps: bench/README.md).
        """
        path = _collection_path(api_version, plural, namespace)
        items: list[Manifest] = []
        query = {"limit": str(_LIST_PAGE), **({"labelSelector": selector} if selector else {})}
        while True:
            page = self._request("GET", path, query)
            for item in page.get("items", []):
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                items.append(transform(item))
            meta = page.get("metadata", {})
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            query = {**query, "continue": meta["continue"]}

    def watch_objects(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        selector: str,
        resource_version: str,
        timeout_s: int,
    ) -> Iterator[tuple[str, Manifest]]:
        """Watch events (type, object) after `resource_version` until the server ends the watch
        after `timeout_s`; bookmarks carry only a newer resourceVersion. A watch that can no
        longer continue (410 Gone) raises TransientApiError with status 410."""
        query = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            **({"labelSelector": selector} if selector else {}),
        }
        path = _collection_path(api_version, plural, namespace)
        try:
            response = self._send("GET", path, query, None, None, (5.0, timeout_s + 30.0))
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                event = orjson.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    code = int(status.get("code", 0))
                    raise TransientApiError(f"watch {path}: {status.get('message')}", code)
                yield str(event.get("type")), event.get("object", {})
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            raise TransientApiError(f"watch {path}: {error}") from error

    def remove_acks(self, route_table: Mapping[str, Any], pods: Sequence[str]) -> None:
        """Remove the acks of `pods` from a RouteTable's status (a JSON merge patch of the status
        subresource; the same object only)."""
        meta = route_table["metadata"]
        path = _object_path(
            ROUTE_TABLE_API_VERSION, ROUTE_TABLE_KIND, meta["namespace"], meta["name"]
        )
        body = {"metadata": {"uid": meta["uid"]}, "status": {"acks": dict.fromkeys(pods)}}
        self._request(
            "PATCH",
            path + "/status",
            {"fieldManager": naming.FIELD_MANAGER},
            body=body,
            content_type="application/merge-patch+json",
        )

    def create_event(self, regarding: Mapping[str, Any], event: Event, now: str) -> None:
        """Post `event` about `regarding` (a core/v1 Event, as `kubectl describe` shows them)."""
        meta = regarding["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": regarding["apiVersion"],
                "kind": regarding["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": naming.FIELD_MANAGER},
            "reportingComponent": naming.FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        path = _collection_path("v1", "events", meta["namespace"])
        self._request("POST", path, {}, body=body, content_type="application/json")

    def delete(self, obj: Mapping[str, Any]) -> None:
        """Delete `obj` if it is still the same object (uid precondition); gone already is fine."""
        meta = obj["metadata"]
        path = _object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        body = {"preconditions": {"uid": meta["uid"]}, "propagationPolicy": "Background"}
        try:
            self._request("DELETE", path, {}, body=body, content_type="application/json")
        except RejectedError as error:
            if error.status not in (404, 409):
                raise

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        *,
        body: Manifest | list[Manifest] | None = None,
        content_type: str | None = None,
    ) -> Manifest:
        try:
            response = self._send(method, path, query, body, content_type, _REQUEST_TIMEOUT_S)
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise TransientApiError(f"{method} {path}: {error}") from error
        result: Manifest = orjson.loads(data) if data else {}
        return result

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: Manifest | list[Manifest] | None,
        content_type: str | None,
        timeout: tuple[float, float],
    ) -> Any:
        """The response, once its status says it succeeded (its body still to be read)."""
        url = self._host + path + ("?" + urlencode(query) if query else "")
        headers = {**self._client.default_headers, "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        # The credentials as the client has them now (a rotated token is read again).
        self._client.update_params_for_auth(headers, [], ["BearerToken"], path, method, None)
        response = self._pool.request(
            method,
            url,
            body=None if body is None else orjson.dumps(body),
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            preload_content=False,
        )
        if response.status >= 400:
            message = _error_message(response.read())
            kind = TransientApiError if response.status in _TRANSIENT_STATUSES else RejectedError
            raise kind(f"{method} {path}: HTTP {response.status}: {message}", response.status)
        return response


def _object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return _collection_path(api_version, RESOURCES[(api_version, kind)], namespace) + "/" + name


def _collection_path(api_version: str, plural: str, namespace: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{plural}"


def _error_message(data: bytes) -> str:
    try:
        return str(orjson.loads(data).get("message", data[:300]))
    except (ValueError, AttributeError):
        return data[:300].decode("utf-8", "replace")
