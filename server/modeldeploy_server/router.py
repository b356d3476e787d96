"""`modeldeploy-server route`: a weighted reverse proxy in front of a model's variants.

The routing decision and the header rules are `modeldeploy_server.routing` (pure), the request
path is `modeldeploy_server.proxy` and the client that talks to the variants
`modeldeploy_server.upstream`; this module is the shell around them: settings, the ASGI entry
(Starlette for the router's own endpoints), the Prometheus metrics and the process entry point.
Where the routes come from (a file, or the RouteTable through the API) is
`modeldeploy_server.routes_source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from modeldeploy_operator.contract import (
    ROUTER_DEFAULT_TIMEOUT_S,
    ROUTER_SHADOW_LOG_ENV,
    ROUTER_SHADOW_LOG_MAX_BYTES_ENV,
    ROUTER_TIMEOUT_ENV,
)
from modeldeploy_server.config import (
    EdgeSettings,
    add_edge_flags,
    parse_bool,
    parse_edge_settings,
    parse_fraction,
    parse_port,
    parse_positive_float,
    parse_positive_int,
    resolve_options,
)
from modeldeploy_server.errors import ConfigError as SettingsError
from modeldeploy_server.health import PassiveHealth
from modeldeploy_server.http_server import build_server, run_until_stopped
from modeldeploy_server.mirror import Mirror, MirrorSettings
from modeldeploy_server.proxy import Proxy, ProxySettings
from modeldeploy_server.request_stats import RequestFamilies, RequestStats
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
    RouterConfig,
    TrustedProxies,
    parse_trusted_proxies,
)
from modeldeploy_server.upstream import Upstream

log = logging.getLogger("modeldeploy.router")

# Below Kubernetes' default 30 s termination grace period, so in-flight requests finish first.
DRAIN_TIMEOUT_S = 25
OWN_PATHS = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})
_DIFFERENCE_BUCKETS = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class RouterSettings:
    """The router process's configuration, read once from flags and MODELDEPLOY_* env vars."""

    routes: RoutesSettings
    host: str
    port: int
    timeout_s: float
    connect_timeout_s: float
    trusted_proxies: TrustedProxies
    shadow_queue: int
    shadow_log_sample: float
    shadow_log_max_bytes: int
    access_log: bool
    edge: EdgeSettings
    shadow_log: Path | None = None


# field -> (env var, parser, default, help). The flag is --field-name; flags win over env vars,
# which win over defaults, and both go through the same parser.
_OPTIONS: dict[str, tuple[str, Callable[[str], Any], str | None, str]] = {
    "host": ("MODELDEPLOY_HOST", str, "0.0.0.0", "address to listen on"),
    "port": ("MODELDEPLOY_PORT", parse_port, "8080", "port to listen on"),
    "timeout_s": (
        ROUTER_TIMEOUT_ENV,
        parse_positive_float,
        str(ROUTER_DEFAULT_TIMEOUT_S),
        "per request: wait for a variant's answer (504 after), and for each piece of a long one",
    ),
    "connect_timeout_s": (
        "MODELDEPLOY_ROUTER_CONNECT_TIMEOUT_S",
        parse_positive_float,
        "5",
        "wait for a connection to a variant",
    ),
    "trusted_proxies": (
        "MODELDEPLOY_ROUTER_TRUSTED_PROXIES",
        parse_trusted_proxies,
        "",
        "comma-separated networks whose X-Forwarded-For/Forwarded/X-Real-IP are kept "
        "(from any other peer they are dropped)",
    ),
    "shadow_queue": (
        "MODELDEPLOY_ROUTER_SHADOW_QUEUE",
        parse_positive_int,
        "256",
        "shadow copies in the shadow worker's hands (waiting, or sent and not answered yet); "
        "more are dropped (and counted)",
    ),
    "shadow_log": (
        ROUTER_SHADOW_LOG_ENV,
        Path,
        None,
        "JSON-lines file for sampled disagreeing shadow answers (off when unset)",
    ),
    "shadow_log_sample": (
        "MODELDEPLOY_ROUTER_SHADOW_LOG_SAMPLE",
        parse_fraction,
        "0.1",
        "fraction of disagreements written to --shadow-log",
    ),
    "shadow_log_max_bytes": (
        ROUTER_SHADOW_LOG_MAX_BYTES_ENV,
        parse_positive_int,
        str(10 << 20),
        "size at which --shadow-log rotates to <file>.1 (one old file kept)",
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
    add_edge_flags(parser)
    args = vars(parser.parse_args(list(argv)))
    try:
        values = resolve_options(
            args,
            environ,
            {name: (env, parse) for name, (env, parse, _, _) in options.items()},
            defaults={name: d for name, (_, _, d, _) in options.items() if d is not None},
        )
        routes = build_routes_settings(values, environ)
        edge = parse_edge_settings(args, environ)
    except SettingsError as exc:
        parser.error(str(exc))
    own = {name: value for name, value in values.items() if name in _OPTIONS}
    return RouterSettings(routes=routes, **own, edge=edge)


class _EjectedGauge(Collector):
    def __init__(self, health: PassiveHealth, current: Callable[[], RouterConfig]) -> None:
        self._health = health
        self._current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modeldeploy_router_variant_ejected",
            "1 while a variant is left out of weighted routing after failures, else 0.",
            labels=["variant"],
        )
        now = time.monotonic()
        for variant in self._current().variants:
            family.add_metric([variant.name], float(self._health.is_ejected(variant.name, now)))
        yield family


class RouterMetrics:
    """The router's Prometheus metrics on its own registry; labels are bounded by the config."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = RequestStats(
            RequestFamilies(
                "modeldeploy_router_requests",
                "Requests answered, by served variant ('' when none was chosen) and status code.",
                "modeldeploy_router_request_duration_seconds",
                "Time from receiving a request to passing on the variant's whole answer.",
                fixed=(),
                key="variant",
                buckets=_LATENCY_BUCKETS,
            )
        )
        self.registry.register(self._requests)
        self.observe = self._requests.observe
        # Probe traffic (requests with the probe header) apart: users' numbers stay users'.
        self._probes = RequestStats(
            RequestFamilies(
                "modeldeploy_router_probe_requests",
                "Probe requests (a rollout's probe traffic) answered, by variant and status code.",
                "modeldeploy_router_probe_request_duration_seconds",
                "Time from receiving a probe request to passing on the variant's whole answer.",
                fixed=(),
                key="variant",
                buckets=_LATENCY_BUCKETS,
            )
        )
        self.registry.register(self._probes)
        self.observe_probe = self._probes.observe
        self._errors = Counter(
            "modeldeploy_router_backend_errors",
            "Requests the variant did not answer: unreachable, timeout or broken connection.",
            ["variant", "reason"],
            registry=self.registry,
        )
        self._weight = Gauge(
            "modeldeploy_router_variant_weight",
            "Current effective weight of each variant in the routing config.",
            ["variant"],
            registry=self.registry,
        )
        self._retries = Counter(
            "modeldeploy_router_retries",
            "Requests sent once more, to another variant, after this one refused the connection "
            "or closed it before answering.",
            ["variant"],
            registry=self.registry,
        )
        self._ejections = Counter(
            "modeldeploy_router_ejections",
            "Times a failing variant was left out of weighted routing for a short, growing time.",
            ["variant"],
            registry=self.registry,
        )
        self._shadow = {
            kind: Counter(
                f"modeldeploy_router_shadow_{kind}",
                f"Shadow copies of requests, by (primary, shadow) variant: {help_}.",
                ["primary", "shadow"],
                registry=self.registry,
            )
            for kind, help_ in (
                ("requests", "offered to the queue"),
                ("dropped", "dropped because the queue was full"),
                ("errors", "the shadow failed or answered with an error"),
                ("agreements", "answers that agree"),
                ("disagreements", "answers that differ beyond the tolerances"),
            )
        }
        # Labelled children, looked up once per label set: the mirror counts every copy.
        self._shadow_children: dict[tuple[str, str, str], Counter] = {}
        self._difference_children: dict[tuple[str, str], Histogram] = {}
        self._shadow_difference = Histogram(
            "modeldeploy_router_shadow_abs_difference",
            "Largest absolute difference between the float outputs of a shadow answer and the "
            "primary's.",
            ["primary", "shadow"],
            buckets=_DIFFERENCE_BUCKETS,
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

    def count_shadow(self, primary: str, shadow: str, kind: str, copies: int = 1) -> None:
        """Count shadow copies by kind: `requests` (offered), `dropped` (queue full), `errors`,
        `agreements` or `disagreements`."""
        key = (kind, primary, shadow)
        child = self._shadow_children.get(key)
        if child is None:
            child = self._shadow_children[key] = self._shadow[kind].labels(primary, shadow)
        child.inc(copies)

    def observe_shadow(
        self, primary: str, shadow: str, agree: bool, difference: float | None
    ) -> None:
        """Count one comparison of a shadow answer with the primary's."""
        self.count_shadow(primary, shadow, "agreements" if agree else "disagreements")
        if difference is not None:
            histogram = self._difference_children.get((primary, shadow))
            if histogram is None:
                histogram = self._shadow_difference.labels(primary, shadow)
                self._difference_children[(primary, shadow)] = histogram
            histogram.observe(difference)

    def count_unrouted(self, code: int) -> None:
        """Count a request that no variant was chosen for."""
        self._requests.count("", code)

    def count_backend_error(self, variant: str, reason: str) -> None:
        """Count a request the variant failed to answer."""
        self._errors.labels(variant, reason).inc()

    def count_retry(self, variant: str) -> None:
        """Count a request sent to another variant after `variant` refused or reset it."""
        self._retries.labels(variant).inc()

    def count_ejection(self, variant: str) -> None:
        """Count a variant being left out of weighted routing for a while."""
        self._ejections.labels(variant).inc()

    def track_ejections(self, health: PassiveHealth, current: Callable[[], RouterConfig]) -> None:
        """Publish, at scrape time, which variants of the current config are ejected."""
        self.registry.register(_EjectedGauge(health, current))

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


class Router:
    """One router process: the current config, the client pool, metrics and the ASGI entry.

    The edge protocol hands proxied requests to `Proxy` directly (`build_server`'s `forward`);
    the ASGI entry is Starlette, for the router's own endpoints and the lifespan.
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
        upstream = Upstream(settings.connect_timeout_s)
        mirror = Mirror(
            MirrorSettings(
                queue_size=settings.shadow_queue,
                timeout_s=settings.timeout_s,
                connect_timeout_s=settings.connect_timeout_s,
                log_path=settings.shadow_log,
                log_sample=settings.shadow_log_sample,
                log_max_bytes=settings.shadow_log_max_bytes,
            ),
            self.metrics,
        )
        self._draining = False
        self.proxy = Proxy(
            ProxySettings(settings.timeout_s, settings.trusted_proxies),
            self,
            upstream,
            self.metrics,
            mirror,
        )
        self.metrics.track_ejections(self.proxy.health, lambda: self.config)
        self._own = Starlette(
            routes=[
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/v2/health/live", self.live, methods=["GET"]),
                Route("/v2/health/ready", self.ready, methods=["GET"]),
            ],
            lifespan=self.lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: the lifespan and the own paths (the edge forwards every other path)."""
        await self._own(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Start the routes source and the proxy; stop both on shutdown."""
        watcher = asyncio.create_task(self._routes.run(self))
        try:
            async with self.proxy.running():
                yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

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

    def drain(self) -> None:
        """SIGTERM arrived: readiness fails from now on."""
        self._draining = True

    async def live(self, _request: Request) -> Response:
        """Liveness: the process answers."""
        return JSONResponse({"live": True})

    async def ready(self, _request: Request) -> Response:
        """Readiness: routes are applied and at least one variant has a share of traffic.

        The body names the applied routes' version (null before any, or for a file without one).
        """
        config = self.config
        if self._draining:
            return JSONResponse({"error": "shutting down", "routesVersion": config.version}, 503)
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
    server = build_server(
        router,
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        graceful_shutdown_s=DRAIN_TIMEOUT_S,
        edge=settings.edge,
        on_drain=router.drain,
        forward=router.proxy,
        local_paths=OWN_PATHS,
        # Logging is set up above, for the router's own messages too.
        log_config=None,
    )
    run_until_stopped(server)
    return 0 if server.started else 1
