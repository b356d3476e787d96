"""The router's pure core: parse the routing config and pick the variant that serves a request.

Imports no web framework and reads neither the environment nor the clock; the random number is
passed in so that the weighted choice is deterministic under test.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_HEADER_OVERRIDE = "x-model-variant"
# A request carrying this header with the routes' `probeToken` is probe traffic (a rollout's
# `modeldeploy-server probe`): served as any other, counted apart from users' requests
# (modeldeploy_router_probe_* metrics, which a rollout judges). Without the token the header is
# dropped, so a user cannot have requests counted as probes.
PROBE_HEADER = "x-modeldeploy-probe"
_PROBE_NAME = PROBE_HEADER.encode("latin-1")
TOTAL_WEIGHT = 100
# Sticky cohorts: a header value hashes to one of this many buckets, laid over the cumulative
# weights, so a weight change of k points moves k% of the buckets and no others.
STICKY_BUCKETS = 10_000

# Variant names become Kubernetes object names and model versions: DNS-1035 labels.
_VARIANT_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# An HTTP header name is an RFC 9110 token.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONFIG_KEYS = frozenset(
    {"version", "model", "headerOverride", "stickyHeader", "shadow", "variants", "probeToken"}
)
_SHADOW_KEYS = frozenset({"variant", "percent", "tolerance"})
DEFAULT_SHADOW_TOLERANCE = 1e-4
_PROBE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# The routes' version (the operator's content hash) becomes a metric label and a RouteTable ack.
_VERSION = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.:]{0,127}$")
_VARIANT_KEYS = frozenset({"name", "url", "weight"})


# RFC 9110 section 7.6.1 hop-by-hop headers: they describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Host and Content-Length belong to the proxy's own connection to the variant; the ASGI server has
# already answered the client's `Expect: 100-continue`; passing it on only adds a round trip.
_NOT_FORWARDED_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# uvicorn writes its own Date; Server would name the variant's web stack.
_NOT_RETURNED_RESPONSE = HOP_BY_HOP | {b"date", b"server"}

# Headers that say who the client is, or how it reached us: set by proxies in front. The router is
# the edge, so from an untrusted peer they are lies or noise, and are dropped.
FORWARDING_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-proto",
        b"x-real-ip",
    }
)
_NOT_FORWARDED_FROM_UNTRUSTED = _NOT_FORWARDED_REQUEST | FORWARDING_HEADERS


class ConfigError(ValueError):
    """The routing config is not valid; the message names the offending field."""


class RoutingError(Exception):
    """A request cannot be routed; `status` is the HTTP status the edge answers with."""

    status = 500


class UnknownVariantError(RoutingError):
    """The override header names a variant that the config does not have."""

    status = 404


class NoRoutableVariantError(RoutingError):
    """Every weight is 0 and the request names no variant."""

    status = 503


@dataclass(frozen=True)
class Variant:
    """One backend: a variant's name, its base URL (no trailing slash) and its effective weight."""

    name: str
    url: str
    weight: int
    # The header line that tells the client which variant answered.
    answer_line: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        line = b"x-model-variant: %s\r\n" % self.name.encode("latin-1")
        object.__setattr__(self, "answer_line", line)


@dataclass(frozen=True)
class ShadowConfig:
    """Mirror `percent` of weighted requests to `variant` (weight 0) and compare its answers.

    Float outputs agree when every row's argmax is the same and no value differs by more than
    `tolerance`; other outputs must be equal.
    """

    variant: str
    percent: float
    tolerance: float = DEFAULT_SHADOW_TOLERANCE


# The kinds of request_header_kinds.
_DROPPED, _FORWARDING, _FORWARDED_FOR, _CONNECTION, _PROBE = range(5)
_TRANSFER_ENCODING, _CONTENT_LENGTH, _STICKY, _OVERRIDE = range(5, 9)


@dataclass(frozen=True)
class RouterConfig:
    """A validated routing table; immutable so a reload swaps it whole.

    One without variants stands for "no routes yet" (a router watching its RouteTable, before the
    first list): it routes nothing.
    """

    model: str
    header_override: str
    variants: tuple[Variant, ...]
    sticky_header: str | None = None
    # What the routes' author says they are (the operator's content hash); None in a file without.
    version: str | None = None
    shadow: ShadowConfig | None = None
    # What the probe header must carry for a request to count as probe traffic (None: none does).
    probe_token: str | None = None
    _by_name: dict[str, Variant] = field(init=False, repr=False, compare=False)
    # Cumulative weights of the variants with weight > 0, for a binary search per request.
    _bounds: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _weighted: tuple[Variant, ...] = field(init=False, repr=False, compare=False)
    _versions_prefix: str = field(init=False, repr=False, compare=False)
    # What read_request_headers does with each request header name that is not simply forwarded.
    request_header_kinds: dict[bytes, int] = field(init=False, repr=False, compare=False)
    # The two headers' names as they arrive from the ASGI server (lower-case bytes).
    override_name: bytes = field(init=False, repr=False, compare=False)
    sticky_name: bytes | None = field(init=False, repr=False, compare=False)
    probe_token_bytes: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weighted = tuple(v for v in self.variants if v.weight > 0)
        bounds: list[int] = []
        for variant in weighted:
            bounds.append((bounds[-1] if bounds else 0) + variant.weight)
        object.__setattr__(self, "_by_name", {v.name: v for v in self.variants})
        object.__setattr__(self, "_bounds", tuple(bounds))
        object.__setattr__(self, "_weighted", weighted)
        object.__setattr__(self, "_versions_prefix", f"/v2/models/{self.model}/versions/")
        object.__setattr__(self, "override_name", self.header_override.encode("latin-1"))
        sticky = self.sticky_header.encode("latin-1") if self.sticky_header else None
        object.__setattr__(self, "sticky_name", sticky)
        token = self.probe_token.encode("ascii") if self.probe_token else None
        object.__setattr__(self, "probe_token_bytes", token)
        # Later entries win, as the earlier branches of a chain of comparisons would.
        kinds = dict.fromkeys(_NOT_FORWARDED_REQUEST, _DROPPED)
        kinds.update(dict.fromkeys(FORWARDING_HEADERS, _FORWARDING))
        kinds[b"x-forwarded-for"] = _FORWARDED_FOR
        kinds[b"connection"] = _CONNECTION
        kinds[_PROBE_NAME] = _PROBE
        kinds[b"transfer-encoding"] = _TRANSFER_ENCODING
        kinds[b"content-length"] = _CONTENT_LENGTH
        if sticky is not None:
            kinds[sticky] = _STICKY
        kinds[self.override_name] = _OVERRIDE
        object.__setattr__(self, "request_header_kinds", kinds)

    @property
    def routable(self) -> bool:
        """Whether a request without the override header can be served."""
        return bool(self._weighted)

    def pinned_variant(self, path: str, header_value: str | None) -> str | None:
        """The variant a request names: the version in a v2 versioned path, else the header's value.

        Every variant serves the model with its own name as version, so
        `/v2/models/<model>/versions/<variant>/...` can only be answered by that variant.
        """
        if path.startswith(self._versions_prefix):
            version = path[len(self._versions_prefix) :].partition("/")[0]
            if version in self._by_name:
                return version
        return header_value

    def choose(
        self,
        override: str | None,
        rand: float,
        sticky: str | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> Variant:
        """Pick the variant for a request: the one the override names, else by weight.

        `rand` is uniform in [0, 1); the override wins even over a weight of 0 (dark launch). A
        `sticky` value (the sticky header's) replaces `rand` by its bucket, so the same value
        always lands on the same variant for the same weights. A weighted choice that falls on a
        variant in `avoid` (ejected, or one that just failed) goes to the others by their weights,
        unless every weighted variant is to be avoided.
        """
        if override is not None:
            variant = self._by_name.get(override)
            if variant is None:
                if not self.variants:
                    raise NoRoutableVariantError("the router has no routes yet")
                known = ", ".join(sorted(self._by_name))
                raise UnknownVariantError(
                    f"unknown variant {override!r} in header {self.header_override}; "
                    f"known variants: {known}"
                )
            return variant
        if not self._weighted:
            if not self.variants:
                raise NoRoutableVariantError("the router has no routes yet")
            raise NoRoutableVariantError(
                f"no variant of model {self.model!r} has a share of traffic (all weights are 0); "
                f"name one with header {self.header_override}"
            )
        if sticky is None:
            point = rand * self._bounds[-1]
        else:
            # Integer arithmetic: every replica draws exactly the same line between variants.
            point = sticky_bucket(sticky) * self._bounds[-1] // STICKY_BUCKETS
        index = min(bisect.bisect_right(self._bounds, point), len(self._weighted) - 1)
        variant = self._weighted[index]
        if variant.name in avoid:
            others = [v for v in self._weighted if v.name not in avoid]
            if others:
                # Where the draw fell inside the avoided variant's share, spread over the others.
                start = self._bounds[index] - variant.weight
                return _by_weight(others, (point - start) / variant.weight)
        return variant


def _by_weight(variants: list[Variant], fraction: float) -> Variant:
    total = sum(v.weight for v in variants)
    point = fraction * total
    for variant in variants:
        point -= variant.weight
        if point < 0:
            return variant
    return variants[-1]


def sticky_bucket(value: str) -> int:
    """The bucket of a sticky header value: a stable hash (the same in every router replica)."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % STICKY_BUCKETS


# What a router watching its RouteTable serves with before its first routes arrive.
NO_ROUTES = RouterConfig(model="", header_override=DEFAULT_HEADER_OVERRIDE, variants=())


def parse_router_config(text: str | bytes) -> RouterConfig:
    """Parse and validate the router's JSON config (a routes file, a RouteTable's spec.routes)."""
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config is not valid JSON: {exc}") from None
    obj = _expect_object(raw, "config")
    _reject_unknown_keys(obj, _CONFIG_KEYS, "config")
    version = obj.get("version")
    if version is not None and (not isinstance(version, str) or not _VERSION.match(version)):
        raise ConfigError(f"version: {version!r} is not 1-128 of [A-Za-z0-9._:-]")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError("model: must be a non-empty string")
    header = _header_name(obj.get("headerOverride", DEFAULT_HEADER_OVERRIDE), "headerOverride")
    sticky = obj.get("stickyHeader")
    if sticky is not None:
        sticky = _header_name(sticky, "stickyHeader")
        if sticky == header:
            raise ConfigError(f"stickyHeader: {sticky!r} is the headerOverride too")
    raw_variants = obj.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise ConfigError("variants: must be a non-empty list")
    variants = tuple(_parse_variant(item, f"variants[{i}]") for i, item in enumerate(raw_variants))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"variants: duplicate names {', '.join(duplicates)}")
    total = sum(v.weight for v in variants)
    if total not in (0, TOTAL_WEIGHT):
        raise ConfigError(
            f"variants: weights sum to {total}; they must sum to {TOTAL_WEIGHT} (or all be 0)"
        )
    raw_shadow = obj.get("shadow")
    shadow = None if raw_shadow is None else _parse_shadow(raw_shadow, variants)
    probe_token = obj.get("probeToken")
    if probe_token is not None and not (
        isinstance(probe_token, str) and _PROBE_TOKEN.match(probe_token)
    ):
        raise ConfigError("probeToken: must be 16-128 of [A-Za-z0-9_-]")
    return RouterConfig(
        model=model,
        header_override=header,
        variants=variants,
        sticky_header=sticky,
        version=version,
        shadow=shadow,
        probe_token=probe_token,
    )


def _parse_shadow(raw: Any, variants: tuple[Variant, ...]) -> ShadowConfig:
    obj = _expect_object(raw, "shadow")
    _reject_unknown_keys(obj, _SHADOW_KEYS, "shadow")
    name = obj.get("variant")
    variant = next((v for v in variants if v.name == name), None)
    if variant is None:
        raise ConfigError(f"shadow.variant: {name!r} is not one of the variants")
    if variant.weight != 0:
        raise ConfigError(f"shadow.variant: {name!r} has weight {variant.weight}; it must be 0")
    percent: Any = obj.get("percent")
    if not _is_number(percent) or not 0 <= percent <= 100:
        raise ConfigError(f"shadow.percent: {percent!r} is not a number in 0..100")
    tolerance = obj.get("tolerance", DEFAULT_SHADOW_TOLERANCE)
    if not _is_number(tolerance) or tolerance < 0:
        raise ConfigError(f"shadow.tolerance: {tolerance!r} is not a number >= 0")
    return ShadowConfig(variant=variant.name, percent=float(percent), tolerance=float(tolerance))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _header_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ConfigError(f"{where}: {value!r} is not an HTTP header name")
    # Lower case because ASGI servers hand over header names so.
    return value.lower()


def _parse_variant(item: Any, where: str) -> Variant:
    obj = _expect_object(item, where)
    _reject_unknown_keys(obj, _VARIANT_KEYS, where)
    name = obj.get("name")
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} is not a DNS-1035 label")
    url = obj.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}.url: must be a string like http://host:8080")
    _check_url(url, f"{where}.url")
    weight = obj.get("weight")
    # bool is an int subclass; `true` is not a weight.
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= TOTAL_WEIGHT:
        raise ConfigError(f"{where}.weight: {weight!r} is not an integer in 0..{TOTAL_WEIGHT}")
    return Variant(name=name, url=url.rstrip("/"), weight=weight)


def _check_url(url: str, where: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {url!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username is not None or port == 0:
        raise ConfigError(f"{where}: {url!r} must be scheme://host[:port][/path] only")


def _expect_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


def _reject_unknown_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_TRUST_CACHE_SIZE = 4096


@dataclass(frozen=True)
class TrustedProxies:
    """The peers whose forwarding headers are believed (CIDR networks; none by default)."""

    networks: tuple[IPNetwork, ...] = ()
    # host -> trusted, so that a request from a known peer parses no address.
    _seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        """Whether the peer at `host` is one of the trusted proxies."""
        known = self._seen.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self.networks)
            if len(self._seen) >= _TRUST_CACHE_SIZE:
                self._seen.clear()
            self._seen[host] = known
        return known


def parse_trusted_proxies(text: str) -> TrustedProxies:
    """Comma-separated CIDR networks or addresses (e.g. `10.0.0.0/8,127.0.0.1`); empty: none."""
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network like 10.0.0.0/8") from None
    return TrustedProxies(tuple(networks))


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a call per field
class IncomingRequest:
    """What the proxy needs from a request's headers, read in one pass."""

    forwarded_headers: list[tuple[bytes, bytes]]
    override: str | None
    sticky: str | None
    content_length: int | None  # None when absent or not a number
    chunked: bool
    probe: bool = False


def read_request_headers(
    raw: list[tuple[bytes, bytes]],
    config: RouterConfig,
    client_host: str | None,
    trusted: TrustedProxies,
) -> IncomingRequest:
    """Split ASGI request headers into those forwarded to the variant and the routing facts.

    Hop-by-hop headers (and those the Connection header names) are dropped. X-Forwarded-For gets
    the peer appended; it and the other forwarding headers are kept only from a trusted proxy
    (otherwise X-Forwarded-For is the peer alone). Header names arrive lower-cased from the ASGI
    server.
    """
    from_trusted = bool(client_host and trusted and trusted.trusts(client_host))
    dropped = _NOT_FORWARDED_REQUEST if from_trusted else _NOT_FORWARDED_FROM_UNTRUSTED
    kinds = config.request_header_kinds
    forwarded: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    override = sticky = None
    content_length = None
    chunked = False
    probe = False
    connection: list[bytes] = []  # Connection values: more hop-by-hop header names
    for name, value in raw:
        # One dict lookup per header rather than a comparison with each name that matters.
        kind = kinds.get(name)
        if kind is None:
            forwarded.append((name, value))
            continue
        if kind == _DROPPED:
            continue
        if kind == _CONTENT_LENGTH:
            content_length = int(value) if value.isdigit() else None
        elif kind == _TRANSFER_ENCODING:
            chunked = True
        elif kind == _FORWARDING:
            if from_trusted:
                forwarded.append((name, value))
        elif kind == _FORWARDED_FOR:
            if from_trusted:
                forwarded_for.append(value)
        elif kind == _CONNECTION:
            connection.append(value)
        elif kind == _PROBE:
            token = config.probe_token_bytes
            probe = token is not None and hmac.compare_digest(value.strip(), token)
            if probe:  # the variant counts it apart too; the token stays here
                forwarded.append((name, b"1"))
        else:  # the override and sticky headers are read and forwarded
            if kind == _OVERRIDE:
                override = value.decode("latin-1").strip()
            else:
                sticky = value.decode("latin-1").strip()
            if name not in dropped:
                forwarded.append((name, value))
    if connection:  # rare in HTTP/1.1: filtered afterwards, they may name earlier headers
        named = {token.strip().lower() for value in connection for token in value.split(b",")}
        forwarded = [(name, value) for name, value in forwarded if name not in named]
        if b"x-forwarded-for" in named:
            forwarded_for.clear()
    if client_host:
        forwarded_for.append(client_host.encode("latin-1"))
    if forwarded_for:
        forwarded.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    return IncomingRequest(forwarded, override, sticky, content_length, chunked, probe)


# Response headers that stop an answer's header lines from going to the client as the variant sent
# them: those `returned_response_headers` drops (but Date, which it replaces by the router's own:
# the variant's is as good), and one the router sets itself.
_NOT_PASSED_AS_SENT = re.compile(
    b"\r\n(?:%s):"
    % b"|".join(map(re.escape, sorted((_NOT_RETURNED_RESPONSE - {b"date"}) | {b"x-model-variant"})))
)


def passed_header_block(block: bytes, variant: Variant) -> bytes | None:
    """A variant's header lines (as sent, each ending in CRLF) for the client, with
    `x-model-variant` added, when none needs to change: no hop-by-hop header, no Server, and a
    Content-Length and a Date present. None otherwise (`returned_response_headers` then)."""
    lowered = b"\r\n" + block.lower()
    # find() rather than `in`: CPython 3.11's `bytes in bytes` first tries the needle as an int,
    # and raising and clearing that TypeError costs more than the search.
    if (
        _NOT_PASSED_AS_SENT.search(lowered)
        or lowered.find(b"\r\ncontent-length:") < 0
        or lowered.find(b"\r\ndate:") < 0
    ):
        return None
    return block + variant.answer_line


def returned_response_headers(
    raw: Sequence[tuple[bytes, bytes]], variant: str
) -> list[tuple[bytes, bytes]]:
    """The variant's response headers for the client: end-to-end ones plus `x-model-variant`."""
    headers = []
    named: set[bytes] = set()
    for name, value in raw:
        name = name.lower()
        if name not in _NOT_RETURNED_RESPONSE:
            headers.append((name, value))
        elif name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    if named:
        headers = [(name, value) for name, value in headers if name not in named]
    headers.append((b"x-model-variant", variant.encode("latin-1")))
    return headers
