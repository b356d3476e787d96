"""`modeldeploy-server route`: a weighted reverse proxy in front of a model's variants.

The routing decision and the header rules are `modeldeploy_server.routing` (pure); this module is
the shell around them: the ASGI app (plain ASGI for proxied requests, Starlette for the router's own
endpoints), the pooled aiohttp client that talks to the variants, the Prometheus metrics and the
process entry point. Where the routes come from (a file, or the ConfigMap through the API) is
`modeldeploy_server.routes_source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from yarl import URL

from modeldeploy_server.config import (
    parse_bool,
    parse_port,
    parse_positive_float,
    resolve_options,
)
from modeldeploy_server.errors import ConfigError as SettingsError
from modeldeploy_server.http_server import build_uvicorn_config, run_until_stopped
from modeldeploy_server.routes_source import OPTIONS as ROUTES_OPTIONS
from modeldeploy_server.routes_source import (
    RoutesSettings,
    RoutesSource,
    build_routes_settings,
    load_initial_routes,
)
from modeldeploy_server.routing import (
    NO_ROUTES,
    ConfigError,
    IncomingRequest,
    RouterConfig,
    RoutingError,
    Variant,
    read_request_headers,
    returned_response_headers,
)

log = logging.getLogger("modeldeploy.router")

# Bodies up to this size are read whole (one write to the backend, a Content-Length on the answer);
# larger or unsized ones stream through in chunks, so the router's memory stays bounded.
BUFFER_LIMIT_BYTES = 1 << 20
STREAM_CHUNK_BYTES = 64 << 10
# uvicorn's default keep-alive, which `modeldeploy-server serve` keeps.
VARIANT_KEEPALIVE_S = 5
# Below Kubernetes' default 30 s termination grace period, so in-flight requests finish first.
DRAIN_TIMEOUT_S = 25
# The status nginx made conventional for "the client closed the connection first"; only a label.
CLIENT_CLOSED_REQUEST = 499
_OWN_PATHS = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class RouterSettings:
    """The router process's configuration, read once from flags and MODELDEPLOY_* env vars."""

    routes: RoutesSettings
    host: str
    port: int
    timeout_s: float
    connect_timeout_s: float
    access_log: bool


# field -> (env var, parser, default, help). The flag is --field-name; flags win over env vars,
# which win over defaults, and both go through the same parser.
_OPTIONS: dict[str, tuple[str, Callable[[str], Any], str | None, str]] = {
    "host": ("MODELDEPLOY_HOST", str, "0.0.0.0", "address to listen on"),
    "port": ("MODELDEPLOY_PORT", parse_port, "8080", "port to listen on"),
    "timeout_s": ("MODELDEPLOY_ROUTER_TIMEOUT_S", parse_positive_float, "60", "wait for answers"),
    "connect_timeout_s": (
        "MODELDEPLOY_ROUTER_CONNECT_TIMEOUT_S",
        parse_positive_float,
        "5",
        "wait for a connection to a variant",
    ),
    "access_log": ("MODELDEPLOY_ACCESS_LOG", parse_bool, "false", "log each request (costs speed)"),
}


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> RouterSettings:
    """Build the settings from flags and the environment; exit 2 with a message if invalid."""
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server route",
        description="Split traffic by weight across a model's variants. Waits are in seconds; "
        "a variant that does not answer in time gives a 504.",
    )
    options = {**_OPTIONS, **ROUTES_OPTIONS}
    for name, (env, _, default, help_) in options.items():
        shown = "" if default is None else f"; default {default}"
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, help=f"{help_} [env {env}{shown}]")
    args = vars(parser.parse_args(list(argv)))
    try:
        values = resolve_options(
            args,
            environ,
            {name: (env, parse) for name, (env, parse, _, _) in options.items()},
            defaults={name: d for name, (_, _, d, _) in options.items() if d is not None},
        )
        routes = build_routes_settings(values, environ)
    except SettingsError as exc:
        parser.error(str(exc))
    own = {name: value for name, value in values.items() if name in _OPTIONS}
    return RouterSettings(routes=routes, **own)


class RouterMetrics:
    """The router's Prometheus metrics on its own registry; labels are bounded by the config."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "modeldeploy_router_requests",
            "Requests answered, by served variant ('' when none was chosen) and status code.",
            ["variant", "code"],
            registry=self.registry,
        )
        self._errors = Counter(
            "modeldeploy_router_backend_errors",
            "Requests the variant did not answer: unreachable, timeout or broken connection.",
            ["variant", "reason"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "modeldeploy_router_request_duration_seconds",
            "Time from receiving a request to passing on the variant's whole answer, by variant.",
            ["variant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._weight = Gauge(
            "modeldeploy_router_variant_weight",
            "Current effective weight of each variant in the routing config.",
            ["variant"],
            registry=self.registry,
        )
        self._reloads = Counter(
            "modeldeploy_router_config_reloads",
            "Routes changes seen, by result (applied or rejected).",
            ["result"],
            registry=self.registry,
        )
        self._routes_info = Gauge(
            "modeldeploy_router_routes_info",
            "1 for the version of the routes being served ('' for a file without a version).",
            ["version"],
            registry=self.registry,
        )

    def observe(self, variant: str, code: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self._requests.labels(variant, str(code)).inc()
        self._latency.labels(variant).observe(seconds)

    def count_unrouted(self, code: int) -> None:
        """Count a request that no variant was chosen for."""
        self._requests.labels("", str(code)).inc()

    def count_backend_error(self, variant: str, reason: str) -> None:
        """Count a request the variant failed to answer."""
        self._errors.labels(variant, reason).inc()

    def set_config(self, old: RouterConfig | None, new: RouterConfig) -> None:
        """Publish the weights of a newly applied config, forgetting removed variants."""
        names = {v.name for v in new.variants}
        for variant in old.variants if old else ():
            if variant.name not in names:
                self._weight.remove(variant.name)
        for variant in new.variants:
            self._weight.labels(variant.name).set(variant.weight)
        self._routes_info.clear()
        self._routes_info.labels(new.version or "").set(1)

    def count_reload(self, applied: bool) -> None:
        """Count a config change, applied or rejected."""
        self._reloads.labels("applied" if applied else "rejected").inc()

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class BackendError(Exception):
    """A variant did not answer; `status` and `reason` say how the edge reports it."""

    def __init__(self, variant: Variant, status: int, reason: str, detail: str) -> None:
        super().__init__(f"variant {variant.name!r} at {variant.url}: {detail}")
        self.status = status
        self.reason = reason


# What talking to a variant can raise (aiohttp's errors, and OSError from the request body's
# stream), mapped to the answer in one table: first match wins, so timeouts (which are also
# ClientErrors and OSErrors) come first. The reason is a metric label.
_CLIENT_FAILURES = (aiohttp.ClientError, OSError)
_BACKEND_ERRORS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (TimeoutError, 504, "timeout", "no answer in time"),
    (aiohttp.ClientConnectorError, 502, "unreachable", "cannot connect"),
    (BaseException, 502, "broken", "connection failed"),
)


def backend_error(variant: Variant, exc: BaseException) -> BackendError:
    """The BackendError that reports a failure to talk to a variant."""
    for kind, status, reason, summary in _BACKEND_ERRORS:
        if isinstance(exc, kind):
            # Some aiohttp errors (timeouts) have no message of their own.
            return BackendError(variant, status, reason, f"{summary}: {exc or type(exc).__name__}")
    raise AssertionError("the table ends with a catch-all")


async def send_json(send: Send, status: int, document: object, variant: str | None = None) -> None:
    """Answer with a JSON document (errors are `{"error": "..."}`)."""
    body = orjson.dumps(document)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if variant is not None:
        headers.append((b"x-model-variant", variant.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    """The whole request body."""
    return b"".join([chunk async for chunk in stream_body(receive)])


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


async def stream_body(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives; raises ClientGone if the client goes away mid-body."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # Raising aborts the upload to the variant rather than ending it as a short, valid body.
            raise ClientGone
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class Router:
    """One router process: the current config, the client pool, metrics and the ASGI entry.

    Proxied requests are handled as plain ASGI, without Starlette's Request/Response objects: it
    measured faster, and a proxy needs none of their parsing. Starlette serves the router's own
    endpoints and runs the lifespan.
    """

    def __init__(
        self, settings: RouterSettings, config: RouterConfig | None, routes: RoutesSource
    ) -> None:
        self.settings = settings
        self.config = config or NO_ROUTES
        self.metrics = RouterMetrics()
        if config is not None:
            self.metrics.set_config(None, config)
        self._routes = routes
        self._session: aiohttp.ClientSession | None = None
        self._own = Starlette(
            routes=[
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/v2/health/live", self.live, methods=["GET"]),
                Route("/v2/health/ready", self.ready, methods=["GET"]),
            ],
            lifespan=self.lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: own paths and the lifespan go to Starlette, everything else is proxied."""
        if scope["type"] != "http" or scope["path"] in _OWN_PATHS:
            await self._own(scope, receive, send)
        else:
            await self.proxy(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Open the client pool and start the routes source; close both on shutdown."""
        # Idle connections are dropped before the variant's uvicorn drops them (its keep-alive is
        # 5 s): a POST sent on a connection the server is closing fails, and aiohttp retries only
        # idempotent methods.
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=512, keepalive_timeout=VARIANT_KEEPALIVE_S - 1
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self.settings.connect_timeout_s,
                sock_read=self.settings.timeout_s,
            ),
            # A proxy passes bodies through untouched and adds no headers of its own.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        watcher = asyncio.create_task(self._routes.run(self))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self._session.close()

    def apply_routes(self, config: RouterConfig, origin: str) -> None:
        """Serve with new routes from now on; requests in flight keep the ones they started with."""
        old, self.config = self.config, config
        self.metrics.set_config(old, config)
        self.metrics.count_reload(applied=True)
        log.info("routes version %s from %s applied: %s", config.version, origin, describe(config))

    def reject_routes(self, origin: str, error: ConfigError) -> None:
        """Count and log invalid routes; the current ones stay."""
        self.metrics.count_reload(applied=False)
        log.error("invalid routes in %s, keeping the current ones: %s", origin, error)

    async def live(self, _request: Request) -> Response:
        """Liveness: the process answers."""
        return JSONResponse({"live": True})

    async def ready(self, _request: Request) -> Response:
        """Readiness: routes are applied and at least one variant has a share of traffic.

        The body names the applied routes' version (null before any, or for a file without one).
        """
        config = self.config
        if not config.variants:
            message = "no routes applied yet"
            return JSONResponse({"error": message, "routesVersion": None}, status_code=503)
        if not config.routable:
            message = f"no variant of model {config.model!r} has a weight above 0"
            return JSONResponse({"error": message, "routesVersion": config.version}, 503)
        return JSONResponse({"ready": True, "routesVersion": config.version})

    async def metrics_endpoint(self, _request: Request) -> Response:
        """Prometheus text exposition of the router's own registry."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the request to the chosen variant and pass its answer back."""
        started = time.perf_counter()
        config = self.config  # one snapshot per request; a reload swaps the attribute whole
        client = scope.get("client")
        incoming = read_request_headers(scope["headers"], config, client[0] if client else None)
        try:
            variant = config.choose(
                config.pinned_variant(scope["path"], incoming.override),
                random.random(),
                incoming.sticky,
            )
        except RoutingError as exc:
            self.metrics.count_unrouted(exc.status)
            await send_json(send, exc.status, {"error": str(exc)})
            return
        try:
            status = await self._forward(scope, receive, send, variant, incoming)
        except ClientGone:
            status = CLIENT_CLOSED_REQUEST
        except BackendError as exc:
            self.metrics.count_backend_error(variant.name, exc.reason)
            log.warning("%s %s: %s", scope["method"], scope["path"], exc)
            status = exc.status
            await send_json(send, status, {"error": str(exc)}, variant.name)
        self.metrics.observe(variant.name, status, time.perf_counter() - started)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        variant: Variant,
        incoming: IncomingRequest,
    ) -> int:
        assert self._session is not None, "the lifespan opens the session before any request"
        target = variant.url + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        body: bytes | AsyncIterator[bytes] | None = None
        length = incoming.content_length
        if length is not None and length <= BUFFER_LIMIT_BYTES:
            body = await read_body(receive)
        elif length is not None or incoming.chunked:
            body = stream_body(receive)
        try:
            upstream = await self._session.request(
                scope["method"],
                URL(target, encoded=True),
                headers=incoming.forwarded_headers,
                data=body,
                allow_redirects=False,
            )
        except _CLIENT_FAILURES as exc:
            # aiohttp wraps what the body stream raised, keeping it as the cause.
            if isinstance(exc.__cause__, ClientGone):
                raise ClientGone from None
            raise backend_error(variant, exc) from None
        try:
            headers = returned_response_headers(upstream.raw_headers, variant.name)
            answer = None
            length = upstream.content_length
            if length is not None and length <= BUFFER_LIMIT_BYTES:
                try:
                    answer = await upstream.read()
                except _CLIENT_FAILURES as exc:
                    raise backend_error(variant, exc) from None
            start = {"type": "http.response.start", "status": upstream.status, "headers": headers}
            await send(start)
            if answer is None:
                await self._stream_answer(send, upstream, variant)
            else:
                await send({"type": "http.response.body", "body": answer})
            return upstream.status
        finally:
            upstream.release()

    async def _stream_answer(
        self, send: Send, upstream: aiohttp.ClientResponse, variant: Variant
    ) -> None:
        try:
            async for chunk in upstream.content.iter_chunked(STREAM_CHUNK_BYTES):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _CLIENT_FAILURES as exc:
            # The status line is gone already: returning without finishing the body makes uvicorn
            # close the connection, so the client sees a cut answer rather than a short, valid one.
            self.metrics.count_backend_error(variant.name, "broken")
            log.warning("variant %r broke off its answer: %r", variant.name, exc)
            return
        await send({"type": "http.response.body", "body": b""})


def describe(config: RouterConfig) -> str:
    """One log line naming the model and each variant's weight and URL."""
    variants = ", ".join(f"{v.name}={v.weight} ({v.url})" for v in config.variants)
    return f"model {config.model!r}: {variants}"


def main(argv: list[str]) -> int:
    """Run the router until SIGTERM/SIGINT; exit 2 with a message if the routes file is invalid."""
    settings = parse_settings(argv, os.environ)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        routes, config = load_initial_routes(settings.routes)
    except (OSError, ConfigError) as exc:
        log.error("cannot start: routes %s: %s", settings.routes.config, exc)
        return 2
    if config is not None:
        log.info("routes version %s loaded: %s", config.version, describe(config))
    router = Router(settings, config, routes)
    server = uvicorn.Server(
        build_uvicorn_config(
            router,
            host=settings.host,
            port=settings.port,
            access_log=settings.access_log,
            graceful_shutdown_s=DRAIN_TIMEOUT_S,
            # Logging is set up above, for the router's own messages too.
            log_config=None,
        )
    )
    run_until_stopped(server)
    return 0 if server.started else 1
