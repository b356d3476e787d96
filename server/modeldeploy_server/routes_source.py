"""Where the router's routes come from: a file (local mode) or its RouteTable, through the API.

In a cluster the router lists and watches its RouteTable (a custom resource the operator writes,
`<md>-routes`, whose `spec.routes` is a routes document in the format of a local routes file)
through the Kubernetes API, by a `metadata.name` field selector; it applies each change as the
watch delivers it, and acknowledges the version it applied with a JSON merge patch of the
RouteTable's status subresource, which the operator reads to tell whether every router has the
current routes:

    status.acks["<pod name>"] = "<routes version>"

The pod runs as its namespace's ServiceAccount `modeldeploy-router`, bound to the ClusterRole of
that name: it may read the namespace's RouteTables and patch their status, nothing else. A
kubelet-mounted ConfigMap volume would reach the pod only at the kubelet's next sync (about a
minute); the watch takes well under a second. Locally (`modeldeploy run`) the routes are a file,
re-read when it changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
import orjson

from modeldeploy_operator.contract import (
    POD_NAME_ENV,
    ROUTE_TABLE_API_VERSION,
    ROUTE_TABLE_ENV,
    ROUTE_TABLE_PLURAL,
    ROUTER_FIELD_MANAGER,
)
from modeldeploy_server.config import parse_positive_float
from modeldeploy_server.errors import ConfigError as SettingsError
from modeldeploy_server.routing import ConfigError, RouterConfig, parse_router_config

log = logging.getLogger("modeldeploy.router")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Projected ServiceAccount tokens are rotated by the kubelet; client-go re-reads them each minute.
TOKEN_REFRESH_S = 60.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# A watch event is one JSON line holding a whole RouteTable (etcd stores at most about 1.5 MiB).
MAX_EVENT_BYTES = 4 << 20
# Beyond the watch's own timeout, before the client gives up on a silent connection.
WATCH_GRACE_S = 30.0
# A list or a patch.
REQUEST_TIMEOUT_S = 30.0
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class RouteTableRef:
    """A RouteTable's namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_route_table_ref(value: str) -> RouteTableRef:
    """NAMESPACE/NAME, each a valid Kubernetes name."""
    namespace, slash, name = value.partition("/")
    if not slash or not _DNS_1123_LABEL.match(namespace) or not _DNS_1123_SUBDOMAIN.match(name):
        raise ValueError("must be NAMESPACE/NAME of a RouteTable")
    return RouteTableRef(namespace, name)


def _pod_name(value: str) -> str:
    # The name becomes a key of the RouteTable's status.acks.
    if not _DNS_1123_SUBDOMAIN.match(value):
        raise ValueError("must be a pod name (lowercase, at most 253 characters)")
    return value


@dataclass(frozen=True)
class RoutesSettings:
    """Where the routes come from: exactly one of `config` (a file) and `route_table`."""

    config: Path | None
    reload_interval_s: float
    route_table: RouteTableRef | None
    pod_name: str | None
    api_server: str | None
    service_account_dir: Path
    watch_timeout_s: float


# The router's options for its routes source: field -> (env var, parser, default, help), the
# same table shape as the router's own options.
OPTIONS: dict[str, tuple[str, Callable[[str], Any], str | None, str]] = {
    "config": ("MODELDEPLOY_ROUTER_CONFIG", Path, None, "routes JSON file, re-read on change"),
    "reload_interval_s": (
        "MODELDEPLOY_ROUTER_RELOAD_INTERVAL_S",
        parse_positive_float,
        "1",
        "seconds between checks of the routes file",
    ),
    "route_table": (
        ROUTE_TABLE_ENV,
        parse_route_table_ref,
        None,
        "NAMESPACE/NAME of the RouteTable holding the routes, watched through the Kubernetes API",
    ),
    "pod_name": (
        POD_NAME_ENV,
        _pod_name,
        None,
        "this pod's name, under which the applied routes version is acknowledged in the "
        "RouteTable's status",
    ),
    "service_account_dir": (
        "MODELDEPLOY_SERVICE_ACCOUNT_DIR",
        Path,
        SERVICE_ACCOUNT_DIR,
        "where the ServiceAccount token, ca.crt are",
    ),
    "watch_timeout_s": (
        "MODELDEPLOY_ROUTER_WATCH_TIMEOUT_S",
        parse_positive_float,
        "300",
        "seconds the API server keeps one watch open before the router starts the next",
    ),
}


def build_routes_settings(values: Mapping[str, Any], environ: Mapping[str, str]) -> RoutesSettings:
    """The routes settings from parsed option values; raises SettingsError if they do not fit."""
    config, route_table = values.get("config"), values.get("route_table")
    if (config is None) == (route_table is None):
        raise SettingsError(
            "exactly one of --config (MODELDEPLOY_ROUTER_CONFIG) and --route-table "
            f"({ROUTE_TABLE_ENV}) is required"
        )
    api_server = None
    if route_table is not None:
        if values.get("pod_name") is None:
            raise SettingsError(f"--route-table needs --pod-name (or {POD_NAME_ENV})")
        host = environ.get("KUBERNETES_SERVICE_HOST")
        port = environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise SettingsError(
                "--route-table needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT "
                "(set in every pod)"
            )
        api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return RoutesSettings(
        config=config,
        reload_interval_s=values["reload_interval_s"],
        route_table=route_table,
        pod_name=values.get("pod_name"),
        api_server=api_server,
        service_account_dir=values["service_account_dir"],
        watch_timeout_s=values["watch_timeout_s"],
    )


class RoutesTarget(Protocol):
    """What a routes source feeds: the router."""

    def apply_routes(self, config: RouterConfig, origin: str) -> None:
        """Serve with these routes from now on."""

    def reject_routes(self, origin: str, error: ConfigError) -> None:
        """Count and report invalid routes; the current ones stay."""


class RoutesSource(Protocol):
    """Feeds the router's routes to `target` until cancelled."""

    async def run(self, target: RoutesTarget) -> None:
        """Watch for new routes until cancelled."""


def offer_routes(
    target: RoutesTarget, data: bytes, origin: str, *, require_version: bool
) -> RouterConfig | None:
    """Parse routes and apply them, or reject them; returns what was applied."""
    try:
        config = parse_router_config(data)
        if require_version and config.version is None:
            raise ConfigError("version: required in a RouteTable (the router acknowledges it)")
    except ConfigError as exc:
        target.reject_routes(origin, exc)
        return None
    target.apply_routes(config, origin)
    return config


def load_initial_routes(settings: RoutesSettings) -> tuple[RoutesSource, RouterConfig | None]:
    """The routes source, and the routes to start with (a file must hold valid ones).

    Raises OSError or ConfigError when the file cannot be read or is invalid. A RouteTable source
    starts with no routes: the router is not ready until the first list applied some.
    """
    if settings.route_table is not None:
        return RouteTableRoutes(settings), None
    assert settings.config is not None, "build_routes_settings requires one of the two"
    data = settings.config.read_bytes()
    return FileRoutes(settings.config, settings.reload_interval_s, data), parse_router_config(data)


class FileRoutes:
    """Routes from a file, re-read each interval and applied when its content changes."""

    def __init__(self, path: Path, interval_s: float, initial: bytes) -> None:
        self._path = path
        self._interval_s = interval_s
        self._seen = initial

    async def run(self, target: RoutesTarget) -> None:
        """Poll the file until cancelled."""
        # A file replaced by an atomic rename (as a ConfigMap volume's `..data` symlink swap) is
        # read whole as either the old or the new content, never a mix.
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                data = await asyncio.to_thread(self._path.read_bytes)
            except OSError as exc:
                if self._seen != b"":
                    log.error("cannot read %s, keeping the current routes: %s", self._path, exc)
                    self._seen = b""
                continue
            if data != self._seen:
                self._seen = data
                offer_routes(target, data, str(self._path), require_version=False)


class ApiError(Exception):
    """The API server refused a request or ended a watch with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class KubernetesApi:
    """The few calls the router makes, authenticated as the pod's ServiceAccount."""

    def __init__(self, server: str, service_account_dir: Path) -> None:
        self._server = server
        self._dir = service_account_dir
        self._token = ""
        self._token_read_at = -TOKEN_REFRESH_S
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> KubernetesApi:
        context = await asyncio.to_thread(
            ssl.create_default_context, cafile=str(self._dir / "ca.crt")
        )
        self._client = httpx.AsyncClient(
            base_url=self._server,
            verify=context,
            headers={"Accept": "application/json", "User-Agent": ROUTER_FIELD_MANAGER},
            timeout=REQUEST_TIMEOUT_S,
        )
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._client is not None
        await self._client.aclose()

    async def _headers(self) -> dict[str, str]:
        if time.monotonic() - self._token_read_at >= TOKEN_REFRESH_S:
            token = await asyncio.to_thread((self._dir / "token").read_text)
            self._token, self._token_read_at = token.strip(), time.monotonic()
        return {"Authorization": f"Bearer {self._token}"}

    @staticmethod
    def _path(ref: RouteTableRef, named: bool) -> str:
        path = f"/apis/{ROUTE_TABLE_API_VERSION}/namespaces/{quote(ref.namespace)}"
        path += f"/{ROUTE_TABLE_PLURAL}"
        return path + (f"/{quote(ref.name)}" if named else "")

    async def list_route_table(self, ref: RouteTableRef) -> tuple[dict[str, Any] | None, str]:
        """The RouteTable (None if it does not exist) and the list's resourceVersion."""
        assert self._client is not None
        response = await self._client.get(
            self._path(ref, False),
            params={"fieldSelector": f"metadata.name={ref.name}"},
            headers=await self._headers(),
        )
        body = _json_body(response.status_code, response.content)
        items = body.get("items") or []
        return (items[0] if items else None), body["metadata"]["resourceVersion"]

    async def watch_route_table(
        self, ref: RouteTableRef, resource_version: str, timeout_s: float
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events after `resource_version`, until the API server ends the watch."""
        assert self._client is not None
        params = {
            "fieldSelector": f"metadata.name={ref.name}",
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(1, round(timeout_s))),
        }
        async with self._client.stream(
            "GET",
            self._path(ref, False),
            params=params,
            headers=await self._headers(),
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=timeout_s + WATCH_GRACE_S),
        ) as response:
            if response.status_code != 200:
                # Raises ApiError with the server's message.
                _json_body(response.status_code, await response.aread())
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_EVENT_BYTES:
                    raise ApiError(response.status_code, "watch event over the size limit")
                for line in lines:
                    if line.strip():
                        yield orjson.loads(line)

    async def acknowledge(self, ref: RouteTableRef, pod: str, version: str) -> None:
        """Set `status.acks[pod] = version` by JSON merge patch of the status subresource."""
        assert self._client is not None
        patch = {"status": {"acks": {pod: version}}}
        response = await self._client.patch(
            self._path(ref, True) + "/status",
            params={"fieldManager": ROUTER_FIELD_MANAGER},
            content=orjson.dumps(patch),
            headers={**await self._headers(), "Content-Type": "application/merge-patch+json"},
        )
        _json_body(response.status_code, response.content)


def _json_body(status: int, body: bytes) -> dict[str, Any]:
    """The answer's JSON object; raises ApiError for an error status or a non-object."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise ApiError(status, f"not a JSON object: {body[:200].decode('utf-8', 'replace')}")
    if status >= 300:
        raise ApiError(status, str(document.get("message", document)))
    return document


# TimeoutError is an OSError, orjson's decode error a ValueError.
_EXPECTED_FAILURES = (ApiError, httpx.HTTPError, OSError, ValueError)


class RouteTableRoutes:
    """Routes from a RouteTable: list, then watch from the list's version; list again on errors."""

    def __init__(self, settings: RoutesSettings) -> None:
        assert settings.route_table is not None and settings.pod_name is not None
        assert settings.api_server is not None
        self._settings = settings
        self._ref = settings.route_table
        self._pod = settings.pod_name
        # The canonical bytes of the last spec.routes seen (keys sorted), so that a status-only
        # change (another router's ack) or a re-encoding is no new routes.
        self._seen: bytes | None = None
        self._applied_version: str | None = None
        self._delay_s = BACKOFF_FIRST_S

    async def run(self, target: RoutesTarget) -> None:
        """List and watch until cancelled; errors are logged and retried with a growing delay."""
        settings = self._settings
        assert settings.api_server is not None
        while True:
            try:
                async with KubernetesApi(settings.api_server, settings.service_account_dir) as api:
                    await self._follow(api, target)
            except _EXPECTED_FAILURES as exc:
                log.warning(
                    "routes from RouteTable %s: %s; listing again in %.1f s",
                    self._ref,
                    exc or type(exc).__name__,
                    self._delay_s,
                )
            except Exception:
                # A bug must not stop the routes from coming: say so loudly and keep trying.
                log.exception("routes from RouteTable %s: unexpected error", self._ref)
            await asyncio.sleep(self._delay_s * random.uniform(0.8, 1.2))
            self._delay_s = min(self._delay_s * 2, BACKOFF_MAX_S)

    async def _follow(self, api: KubernetesApi, target: RoutesTarget) -> None:
        while True:
            try:
                await self._list_and_watch(api, target)
            except ApiError as exc:
                # 410 Gone: the last version seen is older than the API server keeps.
                if exc.status != 410:
                    raise
                log.info("routes watch on %s expired; listing again", self._ref)

    async def _list_and_watch(self, api: KubernetesApi, target: RoutesTarget) -> None:
        route_table, version = await api.list_route_table(self._ref)
        self._delay_s = BACKOFF_FIRST_S
        if route_table is None:
            # A deletion that happened while no watch ran (a relist after 410 or an error): said
            # as the watch says it once routes were applied, which are kept.
            applied = self._applied_version is not None
            gone = "deleted; keeping the current routes" if applied else "does not exist (yet)"
            log.warning("routes RouteTable %s %s", self._ref, gone)
        else:
            await self._observe(api, target, route_table)
        while True:
            # The API server ends each watch after the timeout; the next one resumes from the last
            # version seen (bookmarks keep it fresh while the RouteTable does not change).
            version = await self._watch(api, target, version)

    async def _watch(self, api: KubernetesApi, target: RoutesTarget, version: str) -> str:
        timeout_s = self._settings.watch_timeout_s
        async for event in api.watch_route_table(self._ref, version, timeout_s):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise ApiError(obj.get("code", 0), str(obj.get("message", obj)))
            version = obj.get("metadata", {}).get("resourceVersion", version)
            if kind in ("ADDED", "MODIFIED"):
                await self._observe(api, target, obj)
            elif kind == "DELETED":
                log.warning("routes RouteTable %s deleted; keeping the current routes", self._ref)
        return version

    async def _observe(
        self, api: KubernetesApi, target: RoutesTarget, route_table: dict[str, Any]
    ) -> None:
        """Apply the RouteTable's routes if they changed; acknowledge the applied version."""
        spec = route_table.get("spec")
        routes = spec.get("routes") if isinstance(spec, dict) else None
        # Whatever orjson.loads decoded it encodes again (an integer beyond 64 bits became a float).
        data = orjson.dumps(routes, option=orjson.OPT_SORT_KEYS)
        if data != self._seen:
            self._seen = data
            origin = f"RouteTable {self._ref}"
            if not isinstance(routes, dict):
                problem = "missing" if routes is None else "not a JSON object"
                target.reject_routes(origin, ConfigError(f"spec.routes: {problem}"))
            else:
                applied = offer_routes(target, data, origin, require_version=True)
                if applied is not None:
                    self._applied_version = applied.version
        status = route_table.get("status")
        acks = status.get("acks") if isinstance(status, dict) else None
        acked = acks.get(self._pod) if isinstance(acks, dict) else None
        if self._applied_version is not None and acked != self._applied_version:
            # Also when the operator pruned the ack or the RouteTable was recreated.
            await api.acknowledge(self._ref, self._pod, self._applied_version)
