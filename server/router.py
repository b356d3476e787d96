"""`modeldeploy-server route`: a weighted reverse proxy in front of a model's variants.

The routing decision is `modeldeploy_server.routing` (pure); this module is the shell around it: the
Starlette app, the pooled aiohttp client that talks to the variants, the config file watcher, the
Prometheus metrics and the process entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn
from modeldeploy_server.routing import (
    ConfigError,
    RouterConfig,
    RoutingError,
    Variant,
    parse_router_config,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from yarl import URL

log = logging.getLogger("modeldeploy.router")

# Bodies up to this size are read whole (one write to the backend, a Content-Length on the answer);
# larger or unsized ones stream through in chunks, so the router's memory stays bounded.
BUFFER_LIMIT_BYTES = 1 << 20
STREAM_CHUNK_BYTES = 64 << 10
# Below Kubernetes' default 30 s termination grace period, so in-flight requests finish first.
DRAIN_TIMEOUT_S = 25
PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# RFC 9110 section 7.6.1 hop-by-hop headers, plus those the proxy sets itself: Host and the
# Content-Length of a streamed body belong to the new connection; uvicorn writes its own Date.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED_REQUEST = _HOP_BY_HOP | {"host", "content-length"}
_NOT_FORWARDED_RESPONSE = _HOP_BY_HOP | {"date", "server"}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class RouterSettings:
    """The router process's configuration, read once from flags and MODELDEPLOY_* env vars."""

    config: Path
    host: str
    port: int
    timeout_s: float
    connect_timeout_s: float
    reload_interval_s: float
    access_log: bool


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("must be a port number 0..65535 (0: any free port)")
    return port


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive number")
    return value


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError("must be true or false")
    return text.lower() in ("true", "1")


# field -> (env var, parser, default, help). The flag is --field-name; flags win over env vars,
# which win over defaults, and both go through the same parser.
_OPTIONS: dict[str, tuple[str, Callable[[str], Any], str | None, str]] = {
    "config": ("MODELDEPLOY_ROUTER_CONFIG", Path, None, "routing config JSON, re-read on change"),
    "host": ("MODELDEPLOY_HOST", str, "0.0.0.0", "address to listen on"),
    "port": ("MODELDEPLOY_PORT", _port, "8080", "port to listen on"),
    "timeout_s": ("MODELDEPLOY_ROUTER_TIMEOUT_S", _positive_float, "60", "wait for answers"),
    "connect_timeout_s": (
        "MODELDEPLOY_ROUTER_CONNECT_TIMEOUT_S",
        _positive_float,
        "5",
        "wait for a connection to a variant",
    ),
    "reload_interval_s": (
        "MODELDEPLOY_ROUTER_RELOAD_INTERVAL_S",
        _positive_float,
        "1",
        "seconds between checks of the config file",
    ),
    "access_log": ("MODELDEPLOY_ACCESS_LOG", _bool, "false", "log each request (costs speed)"),
}


def parse_settings(argv: Sequence[str], environ: Mapping[str, str]) -> RouterSettings:
    """Build the settings from flags and the environment; exit 2 with a message if invalid."""
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server route",
        description="Split traffic by weight across a model's variants. Waits are in seconds; "
        "a variant that does not answer in time gives a 504.",
    )
    for name, (env, _, default, help_) in _OPTIONS.items():
        shown = "required" if default is None else f"default {default}"
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, help=f"{help_} [env {env}; {shown}]")
    args = vars(parser.parse_args(list(argv)))
    values: dict[str, Any] = {}
    for name, (env, parse, default, _) in _OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        raw, source = args[name], flag
        if raw is None:
            raw, source = environ.get(env, default), env
        if raw is None:
            parser.error(f"{flag} (or {env}) is required")
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            parser.error(f"{source}={raw!r}: {exc}")
    return RouterSettings(**values)


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
            "Time from receiving a request to having the variant's answer, by variant.",
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
            "Config file changes seen, by result (applied or rejected).",
            ["result"],
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


def json_error(status: int, message: str) -> Response:
    """The JSON error body every failure answers with."""
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json"
    )


def forwarded_request_headers(
    raw: Iterable[tuple[bytes, bytes]], client_host: str | None
) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, with the client appended to X-Forwarded-For."""
    raw = list(raw)
    dropped = _NOT_FORWARDED_REQUEST | _connection_tokens(raw)
    headers: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    for name_bytes, value_bytes in raw:
        name = name_bytes.decode("latin-1").lower()
        value = value_bytes.decode("latin-1")
        if name == "x-forwarded-for":
            forwarded_for.append(value)
        elif name not in dropped:
            headers.append((name, value))
    if client_host:
        forwarded_for.append(client_host)
    if forwarded_for:
        headers.append(("x-forwarded-for", ", ".join(forwarded_for)))
    return headers


def returned_response_headers(
    raw: Iterable[tuple[bytes, bytes]], variant: str
) -> list[tuple[bytes, bytes]]:
    """The variant's response headers minus hop-by-hop ones, plus `x-model-variant`."""
    raw = list(raw)
    dropped = _NOT_FORWARDED_RESPONSE | _connection_tokens(raw)
    headers = [(name.lower(), value) for name, value in raw if name.lower().decode() not in dropped]
    headers.append((b"x-model-variant", variant.encode()))
    return headers


def _connection_tokens(raw: Iterable[tuple[bytes, bytes]]) -> set[str]:
    # Headers named in Connection are hop-by-hop too (RFC 9110 section 7.6.1).
    return {
        token.strip().lower()
        for name, value in raw
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }


class Router:
    """The mutable state of one router process: the current config, the client pool, metrics."""

    def __init__(self, settings: RouterSettings, config: RouterConfig, config_bytes: bytes) -> None:
        self.settings = settings
        self.config = config
        self.metrics = RouterMetrics()
        self.metrics.set_config(None, config)
        self._config_bytes = config_bytes
        self._session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Open the client pool and start the config watcher; close both on shutdown."""
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=512, keepalive_timeout=30)
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
        watcher = asyncio.create_task(self._watch_config())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self._session.close()

    async def _watch_config(self) -> None:
        # ConfigMap volumes change by an atomic swap of the `..data` symlink, so reading the whole
        # (small) file each interval sees either the old or the new content, never a mix.
        path = self.settings.config
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                if self._config_bytes != b"":
                    log.error("cannot read config %s, keeping the current one: %s", path, exc)
                    self._config_bytes = b""
                continue
            if data != self._config_bytes:
                self._config_bytes = data
                self.apply_config(data)

    def apply_config(self, data: bytes) -> None:
        """Swap in a new config if it is valid; otherwise keep serving with the current one."""
        try:
            config = parse_router_config(data)
        except ConfigError as exc:
            self.metrics.count_reload(applied=False)
            log.error(
                "invalid config in %s, keeping the current one: %s", self.settings.config, exc
            )
            return
        old, self.config = self.config, config
        self.metrics.set_config(old, config)
        self.metrics.count_reload(applied=True)
        log.info("config applied: %s", describe(config))

    async def live(self, _request: Request) -> Response:
        """Liveness: the process answers."""
        return Response(orjson.dumps({"live": True}), media_type="application/json")

    async def ready(self, _request: Request) -> Response:
        """Readiness: a config is loaded and at least one variant has a share of traffic."""
        if not self.config.routable:
            return json_error(
                503, f"no variant of model {self.config.model!r} has a weight above 0"
            )
        return Response(orjson.dumps({"ready": True}), media_type="application/json")

    async def metrics_endpoint(self, _request: Request) -> Response:
        """Prometheus text exposition of the router's own registry."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def proxy(self, request: Request) -> Response:
        """Send the request to the chosen variant and pass its answer back."""
        started = time.perf_counter()
        config = self.config  # one snapshot per request; a reload swaps the attribute whole
        try:
            variant = config.choose(
                config.pinned_variant(
                    request.scope["path"], request.headers.get(config.header_override)
                ),
                random.random(),
            )
        except RoutingError as exc:
            self.metrics.count_unrouted(exc.status)
            return json_error(exc.status, str(exc))
        try:
            response = await self._forward(request, variant)
        except BackendError as exc:
            self.metrics.count_backend_error(variant.name, exc.reason)
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            response = json_error(exc.status, str(exc))
            response.headers["x-model-variant"] = variant.name
        self.metrics.observe(variant.name, response.status_code, time.perf_counter() - started)
        return response

    async def _forward(self, request: Request, variant: Variant) -> Response:
        assert self._session is not None, "the lifespan opens the session before any request"
        scope = request.scope
        target = variant.url + scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = forwarded_request_headers(
            request.headers.raw, request.client.host if request.client else None
        )
        try:
            upstream = await self._session.request(
                request.method,
                URL(target, encoded=True),
                headers=headers,
                data=await _request_body(request),
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise BackendError(variant, 504, "timeout", f"no answer in time ({exc})") from None
        except aiohttp.ClientConnectorError as exc:
            raise BackendError(variant, 502, "unreachable", f"cannot connect: {exc}") from None
        except aiohttp.ClientError as exc:
            raise BackendError(variant, 502, "broken", f"connection failed: {exc!r}") from None
        response_headers = returned_response_headers(upstream.raw_headers, variant.name)
        length = upstream.content_length
        if length is not None and length <= BUFFER_LIMIT_BYTES:
            try:
                body = await upstream.read()
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                raise BackendError(variant, 504, "timeout", f"answer too slow ({exc})") from None
            except aiohttp.ClientError as exc:
                raise BackendError(variant, 502, "broken", f"answer cut: {exc!r}") from None
            finally:
                upstream.release()
            response = Response(body, status_code=upstream.status)
        else:
            response = StreamingResponse(
                upstream.content.iter_chunked(STREAM_CHUNK_BYTES),
                status_code=upstream.status,
                background=BackgroundTask(upstream.release),
            )
        response.raw_headers = response_headers
        return response

    def app(self) -> Starlette:
        """The ASGI app: the router's own endpoints, and everything else proxied."""
        return Starlette(
            routes=[
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/v2/health/live", self.live, methods=["GET"]),
                Route("/v2/health/ready", self.ready, methods=["GET"]),
                Route("/{path:path}", self.proxy, methods=PROXIED_METHODS),
            ],
            lifespan=self.lifespan,
        )


async def _request_body(request: Request) -> bytes | AsyncIterator[bytes] | None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= BUFFER_LIMIT_BYTES:
        return await request.body()
    if length is None and "transfer-encoding" not in request.headers:
        return None
    return request.stream()


def describe(config: RouterConfig) -> str:
    """One log line naming the model and each variant's weight and URL."""
    variants = ", ".join(f"{v.name}={v.weight} ({v.url})" for v in config.variants)
    return f"model {config.model!r}: {variants}"


def main(argv: list[str]) -> int:
    """Run the router until SIGTERM/SIGINT; exit 2 with a message if the config is invalid."""
    settings = parse_settings(argv, os.environ)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config_bytes = settings.config.read_bytes()
        config = parse_router_config(config_bytes)
    except (OSError, ConfigError) as exc:
        log.error("cannot start: config %s: %s", settings.config, exc)
        return 2
    log.info("config loaded: %s", describe(config))
    router = Router(settings, config, config_bytes)
    server = uvicorn.Server(
        uvicorn.Config(
            router.app(),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=settings.access_log,
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
        )
    )
    server.run()
    return 0 if server.started else 1
