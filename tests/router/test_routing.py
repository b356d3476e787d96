"""The router's pure core: config parsing, weighted choice, pinning, and the header rules."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from modeldeploy_server.routing import (
    NO_ROUTES,
    ConfigError,
    IncomingRequest,
    NoRoutableVariantError,
    RouterConfig,
    UnknownVariantError,
    Variant,
    parse_router_config,
    parse_trusted_proxies,
    passed_header_block,
    read_request_headers,
    returned_response_headers,
)


def config_json(**changes: Any) -> str:
    """The brief's example config with top-level fields replaced."""
    obj: dict[str, Any] = {
        "model": "iris",
        "headerOverride": "x-model-variant",
        "variants": [
            {"name": "v1", "url": "http://iris-v1.ns.svc:8080", "weight": 90},
            {"name": "v2", "url": "http://iris-v2.ns.svc:8080", "weight": 10},
        ],
    }
    obj.update(changes)
    return json.dumps(obj)


def variants_json(*weights: int) -> str:
    """A config with one variant per weight, named v1, v2, ..."""
    return config_json(
        variants=[
            {"name": f"v{i}", "url": f"http://127.0.0.1:{9000 + i}", "weight": w}
            for i, w in enumerate(weights, start=1)
        ]
    )


def test_parse_example_config() -> None:
    config = parse_router_config(config_json())
    assert config == RouterConfig(
        model="iris",
        header_override="x-model-variant",
        variants=(
            Variant("v1", "http://iris-v1.ns.svc:8080", 90),
            Variant("v2", "http://iris-v2.ns.svc:8080", 10),
        ),
    )
    assert config.routable


def test_parse_defaults_and_normalises() -> None:
    obj = json.loads(config_json())
    del obj["headerOverride"]
    obj["variants"][0]["url"] += "/"
    config = parse_router_config(json.dumps(obj).encode())
    assert config.header_override == "x-model-variant"
    assert config.variants[0].url == "http://iris-v1.ns.svc:8080"
    assert parse_router_config(config_json(headerOverride="X-Canary")).header_override == "x-canary"


def test_version_is_optional_and_kept() -> None:
    assert parse_router_config(config_json()).version is None
    assert parse_router_config(config_json(version="0123abcd")).version == "0123abcd"


def test_no_routes_yet_routes_nothing() -> None:
    assert not NO_ROUTES.routable
    for override in (None, "v1"):
        with pytest.raises(NoRoutableVariantError, match="the router has no routes yet"):
            NO_ROUTES.choose(override, 0.5)


def test_all_weights_zero_is_valid_but_not_routable() -> None:
    config = parse_router_config(variants_json(0, 0))
    assert not config.routable


def _variant(**changes: Any) -> str:
    """A one-variant config with fields replaced; `...` removes a field."""
    variant: dict[str, Any] = {"name": "v1", "url": "http://127.0.0.1:9001", "weight": 100}
    variant.update(changes)
    return config_json(variants=[{k: v for k, v in variant.items() if v is not ...}])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[]", "config: must be a JSON object, got list"),
        (config_json(model=""), "model: must be a non-empty string"),
        (config_json(model=3), "model: must be a non-empty string"),
        (config_json(headerOverride="x model"), "headerOverride: 'x model' is not an HTTP header"),
        (config_json(headerOverride=""), "headerOverride: '' is not an HTTP header"),
        (config_json(variants=[]), "variants: must be a non-empty list"),
        (config_json(variants={"v1": 100}), "variants: must be a non-empty list"),
        (config_json(variants=["v1"]), "variants[0]: must be a JSON object, got str"),
        (config_json(weights=[90, 10]), "config: unknown field(s) weights"),
        (config_json(version=""), "version: '' is not 1-128 of [A-Za-z0-9._:-]"),
        (config_json(version=7), "version: 7 is not 1-128 of"),
        (config_json(version="a b"), "version: 'a b' is not 1-128 of"),
        (config_json(version="a" * 129), "is not 1-128 of"),
        (_variant(port=8080), "variants[0]: unknown field(s) port"),
        (_variant(name=...), "variants[0].name: None is not a DNS-1035 label"),
        (_variant(name="V1"), "variants[0].name: 'V1' is not a DNS-1035 label"),
        (_variant(name="1v"), "variants[0].name: '1v' is not a DNS-1035 label"),
        (_variant(name="v1-"), "variants[0].name: 'v1-' is not a DNS-1035 label"),
        (_variant(name="v" * 64), "is not a DNS-1035 label"),
        (_variant(url=...), "variants[0].url: must be a string"),
        (_variant(url="iris-v1:8080"), "must be an http:// or https:// URL with a host"),
        (_variant(url="ftp://host"), "must be an http:// or https:// URL with a host"),
        (_variant(url="http://"), "must be an http:// or https:// URL with a host"),
        (_variant(url="http://host:99999"), "variants[0].url: 'http://host:99999' is not a valid"),
        (_variant(url="http://host/?a=1"), "must be scheme://host[:port][/path] only"),
        (_variant(url="http://u:p@host"), "must be scheme://host[:port][/path] only"),
        (_variant(weight=...), "variants[0].weight: None is not an integer in 0..100"),
        (_variant(weight=101), "variants[0].weight: 101 is not an integer in 0..100"),
        (_variant(weight=-1), "variants[0].weight: -1 is not an integer in 0..100"),
        (_variant(weight=99.5), "variants[0].weight: 99.5 is not an integer in 0..100"),
        (_variant(weight=True), "variants[0].weight: True is not an integer in 0..100"),
        (_variant(weight="100"), "variants[0].weight: '100' is not an integer in 0..100"),
        (config_json(probeToken="short"), "probeToken: must be 16-128 of [A-Za-z0-9_-]"),
        (config_json(probeToken="x" * 15 + "!"), "probeToken: must be 16-128 of [A-Za-z0-9_-]"),
        (config_json(probeToken=12345678901234567), "probeToken: must be 16-128 of"),
        (variants_json(90, 20), "variants: weights sum to 110; they must sum to 100"),
        (variants_json(50), "variants: weights sum to 50; they must sum to 100"),
        (
            config_json(
                variants=[
                    {"name": "a", "url": "http://h:1", "weight": 50},
                    {"name": "a", "url": "http://h:2", "weight": 50},
                ]
            ),
            "variants: duplicate names a",
        ),
    ],
)
def test_invalid_config_is_rejected_naming_the_field(text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_router_config(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("weights", "rand", "expected"),
    [
        ((90, 10), 0.0, "v1"),
        ((90, 10), 0.8999, "v1"),
        ((90, 10), 0.9, "v2"),
        ((90, 10), 0.9999999, "v2"),
        ((0, 100), 0.0, "v2"),
        ((100, 0), 0.9999999, "v1"),
        ((0, 50, 0, 50), 0.0, "v2"),
        ((0, 50, 0, 50), 0.5, "v4"),
        ((33, 33, 34), 0.33, "v2"),
        ((33, 33, 34), 0.66, "v3"),
    ],
)
def test_weighted_choice_follows_cumulative_weights(
    weights: tuple[int, ...], rand: float, expected: str
) -> None:
    config = parse_router_config(variants_json(*weights))
    assert config.choose(None, rand).name == expected


@pytest.mark.parametrize("weights", [(90, 10), (1, 99), (0, 100), (25, 0, 25, 50), (100,)])
def test_uniform_randoms_reproduce_weights_exactly(weights: tuple[int, ...]) -> None:
    config = parse_router_config(variants_json(*weights))
    # 10,000 evenly spaced randoms cover [0, 1) uniformly, so each variant's count is weight * 100.
    counts = Counter(config.choose(None, (i + 0.5) / 10_000).name for i in range(10_000))
    assert {f"v{i}": w * 100 for i, w in enumerate(weights, start=1) if w} == dict(counts)


@pytest.mark.parametrize("weights", [(90, 10), (100, 0), (0, 100), (0, 0)])
@pytest.mark.parametrize("name", ["v1", "v2"])
def test_override_pins_any_known_variant_even_at_weight_zero(
    weights: tuple[int, int], name: str
) -> None:
    config = parse_router_config(variants_json(*weights))
    assert all(config.choose(name, rand).name == name for rand in (0.0, 0.5, 0.99))


def test_unknown_override_names_the_variant_and_the_known_ones() -> None:
    config = parse_router_config(variants_json(90, 10))
    with pytest.raises(UnknownVariantError) as caught:
        config.choose("v3", 0.5)
    assert caught.value.status == 404
    assert (
        str(caught.value)
        == "unknown variant 'v3' in header x-model-variant; known variants: v1, v2"
    )


def test_all_zero_without_override_is_unavailable() -> None:
    config = parse_router_config(variants_json(0, 0))
    with pytest.raises(NoRoutableVariantError) as caught:
        config.choose(None, 0.5)
    assert caught.value.status == 503
    assert "all weights are 0" in str(caught.value)
    assert "x-model-variant" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "header", "expected"),
    [
        ("/v2/models/iris/versions/v2/infer", None, "v2"),
        ("/v2/models/iris/versions/v2", None, "v2"),
        ("/v2/models/iris/versions/v1/infer", "v2", "v1"),  # the path names the only answerer
        ("/v2/models/iris/versions/v9/infer", None, None),  # not ours: the server answers 404
        ("/v2/models/iris/versions/v9/infer", "v2", "v2"),
        ("/v2/models/other/versions/v2/infer", None, None),
        ("/v2/models/iris/infer", None, None),
        ("/v2/models/iris/infer", "v1", "v1"),
        ("/v1/models/iris:predict", "v2", "v2"),
        ("/v1/models/iris:predict", "nope", "nope"),  # choose() rejects it with a 404
    ],
)
def test_pinned_variant_from_versioned_path_or_header(
    path: str, header: str | None, expected: str | None
) -> None:
    config = parse_router_config(variants_json(90, 10))
    assert config.pinned_variant(path, header) == expected


NO_TRUST = parse_trusted_proxies("")


def test_request_headers_drop_hop_by_hop_and_extend_forwarded_for_from_a_trusted_proxy() -> None:
    raw = [
        (b"host", b"router:8080"),
        (b"content-type", b"application/json"),
        (b"content-length", b"42"),
        (b"connection", b"keep-alive, x-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-hop", b"1"),
        (b"te", b"trailers"),
        (b"expect", b"100-continue"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-real-ip", b"10.0.0.1"),
        (b"x-model-variant", b" v2 "),
        (b"authorization", b"Bearer t"),
        (b"accept", b"*/*"),
        (b"accept", b"text/csv"),
    ]
    trusted = parse_trusted_proxies("127.0.0.0/8, ::1")
    incoming = read_request_headers(raw, parse_router_config(config_json()), "127.0.0.1", trusted)
    assert incoming == IncomingRequest(
        forwarded_headers=[
            (b"content-type", b"application/json"),
            (b"x-real-ip", b"10.0.0.1"),
            (b"x-model-variant", b" v2 "),
            (b"authorization", b"Bearer t"),
            (b"accept", b"*/*"),
            (b"accept", b"text/csv"),
            (b"x-forwarded-for", b"10.0.0.1, 127.0.0.1"),
        ],
        override="v2",
        sticky=None,
        content_length=42,
        chunked=False,
    )


def test_headers_named_by_connection_are_dropped_wherever_they_are() -> None:
    raw = [
        (b"x-early", b"1"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"accept", b"*/*"),
        (b"connection", b"X-Early"),
        (b"connection", b" x-forwarded-for , x-late"),
        (b"x-late", b"2"),
    ]
    trusted = parse_trusted_proxies("127.0.0.0/8")
    incoming = read_request_headers(raw, parse_router_config(config_json()), "127.0.0.1", trusted)
    assert incoming.forwarded_headers == [(b"accept", b"*/*"), (b"x-forwarded-for", b"127.0.0.1")]


SPOOFED = [
    (b"x-forwarded-for", b"1.2.3.4"),
    (b"x-forwarded-for", b"5.6.7.8"),
    (b"forwarded", b"for=1.2.3.4;proto=https"),
    (b"x-real-ip", b"1.2.3.4"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"admin.example.com"),
    (b"x-forwarded-port", b"443"),
    (b"accept", b"*/*"),
]


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [("192.0.2.7", ""), ("192.0.2.7", "10.0.0.0/8,127.0.0.1"), ("::1", "127.0.0.0/8")],
)
def test_forwarding_headers_from_an_untrusted_peer_are_replaced_by_the_peer(
    peer: str, trusted: str
) -> None:
    config = parse_router_config(config_json())
    incoming = read_request_headers(SPOOFED, config, peer, parse_trusted_proxies(trusted))
    assert incoming.forwarded_headers == [(b"accept", b"*/*"), (b"x-forwarded-for", peer.encode())]


def test_forwarding_headers_from_a_trusted_peer_pass_and_the_peer_is_appended() -> None:
    config = parse_router_config(config_json())
    trusted = parse_trusted_proxies("10.1.0.0/16")
    incoming = read_request_headers(SPOOFED, config, "10.1.2.3", trusted)
    assert incoming.forwarded_headers == [
        *[(n, v) for n, v in SPOOFED if n != b"x-forwarded-for"],
        (b"x-forwarded-for", b"1.2.3.4, 5.6.7.8, 10.1.2.3"),
    ]


@pytest.mark.parametrize("text", ["10.0.0.0/33", "example.com", "10.0.0.0/8,,nope"])
def test_trusted_proxies_must_be_networks(text: str) -> None:
    with pytest.raises(ValueError, match="is not an IP network"):
        parse_trusted_proxies(text)


@pytest.mark.parametrize(
    ("raw", "override", "content_length", "chunked"),
    [
        ([], None, None, False),
        ([(b"transfer-encoding", b"chunked")], None, None, True),
        ([(b"content-length", b"-1")], None, None, False),
        ([(b"content-length", b"0"), (b"x-canary", b"v1")], "v1", 0, False),
        ([(b"x-model-variant", b"v1")], None, None, False),  # not the configured header
    ],
)
def test_request_routing_facts(
    raw: list[tuple[bytes, bytes]], override: str | None, content_length: int | None, chunked: bool
) -> None:
    config = parse_router_config(config_json(headerOverride="x-canary"))
    incoming = read_request_headers(raw, config, None, NO_TRUST)
    assert (incoming.override, incoming.content_length, incoming.chunked) == (
        override,
        content_length,
        chunked,
    )
    assert all(name != b"x-forwarded-for" for name, _ in incoming.forwarded_headers)


TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("routes_token", "sent", "probe"),
    [
        (TOKEN, TOKEN.encode(), True),
        (TOKEN, b" " + TOKEN.encode() + b" ", True),  # optional whitespace around a value
        (TOKEN, b"1", False),
        (TOKEN, TOKEN.encode()[:-1], False),
        (TOKEN, TOKEN.encode() + b"0", False),
        (TOKEN, b"", False),
        (None, b"1", False),  # routes without a token: no request is probe traffic
        (None, TOKEN.encode(), False),
    ],
)
def test_probe_header_counts_only_with_the_routes_token(
    routes_token: str | None, sent: bytes, probe: bool
) -> None:
    """Only the rollout's probe Job knows the token: a user who sends the header stays a user,
    and the variant never sees it; a probe reaches the variant marked, without the token."""
    config = parse_router_config(config_json(probeToken=routes_token))
    raw = [(b"x-modeldeploy-probe", sent), (b"accept", b"*/*")]
    incoming = read_request_headers(raw, config, "127.0.0.1", NO_TRUST)
    assert incoming.probe is probe
    marked = [(b"x-modeldeploy-probe", b"1")] if probe else []
    assert incoming.forwarded_headers == [
        *marked,
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"127.0.0.1"),
    ]


def test_response_headers_keep_end_to_end_ones_and_name_the_variant() -> None:
    raw = (
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"17"),
        (b"x-model-version", b"v2"),
        (b"x-model-sha256", b"ab" * 32),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"secret"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"Sat, 21 Nov 2026 09:00:00 GMT"),
        (b"Server", b"uvicorn"),
    )
    assert returned_response_headers(raw, "v2") == [
        (b"content-type", b"application/json"),
        (b"content-length", b"17"),
        (b"x-model-version", b"v2"),
        (b"x-model-sha256", b"ab" * 32),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-model-variant", b"v2"),
    ]


PLAIN_ANSWER_LINES = (
    b"date: Sat, 21 Nov 2026 09:00:00 GMT\r\ncontent-type: application/json\r\n"
    b"Content-Length: 17\r\nx-model-version: v2\r\n"
)


def test_a_plain_answer_s_header_lines_pass_as_sent_with_the_variant_named() -> None:
    variant = Variant("v2", "http://v2", 10)
    assert passed_header_block(PLAIN_ANSWER_LINES, variant) == (
        PLAIN_ANSWER_LINES + b"x-model-variant: v2\r\n"
    )


@pytest.mark.parametrize(
    "line",
    [
        b"Connection: close\r\n",
        b"keep-alive: timeout=5\r\n",
        b"transfer-encoding: chunked\r\n",
        b"TE: trailers\r\n",
        b"Trailer: x-checksum\r\n",
        b"upgrade: h2c\r\n",
        b"proxy-connection: keep-alive\r\n",
        b"Server: uvicorn\r\n",
        b"X-Model-Variant: v1\r\n",
    ],
)
def test_answer_lines_that_must_change_are_not_passed_as_sent(line: bytes) -> None:
    """Any of these, first or among the others, sends the answer through
    `returned_response_headers` instead."""
    variant = Variant("v2", "http://v2", 10)
    assert passed_header_block(line + PLAIN_ANSWER_LINES, variant) is None
    assert passed_header_block(PLAIN_ANSWER_LINES + line, variant) is None


@pytest.mark.parametrize("name", [b"date", b"content-length"])
def test_answer_lines_without_a_date_or_a_length_are_not_passed_as_sent(name: bytes) -> None:
    lines = [line for line in PLAIN_ANSWER_LINES.split(b"\r\n") if line]
    kept = b"".join(line + b"\r\n" for line in lines if not line.lower().startswith(name + b":"))
    assert passed_header_block(kept, Variant("v2", "http://v2", 10)) is None
    # A name that only starts like one of them does not count as it.
    assert passed_header_block(kept + name + b"-x: 1\r\n", Variant("v2", "http://v2", 10)) is None


def test_sticky_header_is_parsed_lower_case_and_read_from_requests() -> None:
    config = parse_router_config(config_json(stickyHeader="X-User"))
    assert config.sticky_header == "x-user"
    raw = [(b"x-user", b" alice "), (b"accept", b"*/*")]
    incoming = read_request_headers(raw, config, None, NO_TRUST)
    assert incoming.sticky == "alice"
    # The header still reaches the variant: it is the application's, not the router's.
    assert (b"x-user", b" alice ") in incoming.forwarded_headers
    assert parse_router_config(config_json()).sticky_header is None


@pytest.mark.parametrize(
    ("sticky", "fragment"),
    [("x user", "stickyHeader: 'x user' is not an HTTP header name"), ("X-Model-Variant", "too")],
)
def test_invalid_sticky_header_is_refused(sticky: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_router_config(config_json(stickyHeader=sticky))


def cohorts(config: RouterConfig, values: list[str]) -> dict[str, str]:
    return {value: config.choose(None, 0.0, value).name for value in values}


USERS = [f"user-{i}" for i in range(10_000)]


def test_sticky_values_split_by_weight_within_binomial_bounds() -> None:
    config = parse_router_config(variants_json(90, 10))
    counts = Counter(cohorts(config, USERS).values())
    # n=10,000, p=0.1: sd = 30, so 4.5 sd either side is 865..1135.
    assert 865 <= counts["v2"] <= 1135, counts
    assert counts["v1"] + counts["v2"] == len(USERS)


def test_sticky_value_ignores_the_random_draw_and_the_override_still_wins() -> None:
    config = parse_router_config(variants_json(50, 50))
    for value in USERS[:200]:
        chosen = {config.choose(None, rand, value).name for rand in (0.0, 0.3, 0.7, 0.999)}
        assert len(chosen) == 1, value
        assert config.choose("v2", 0.0, value).name == "v2"


def test_weight_change_moves_only_the_buckets_it_must() -> None:
    before = cohorts(parse_router_config(variants_json(90, 10)), USERS)
    after = cohorts(parse_router_config(variants_json(80, 20)), USERS)
    moved = {v: (before[v], after[v]) for v in USERS if before[v] != after[v]}
    assert set(moved.values()) == {("v1", "v2")}
    # About 10% of values: binomial with p=0.1 again.
    assert 865 <= len(moved) <= 1135, len(moved)


def test_sticky_cohorts_skip_variants_without_weight() -> None:
    config = parse_router_config(variants_json(0, 100))
    assert set(cohorts(config, USERS[:500]).values()) == {"v2"}


@pytest.mark.parametrize("sticky", [None, "user-7"])
def test_avoided_variant_hands_its_share_to_the_others_by_weight(sticky: str | None) -> None:
    config = parse_router_config(variants_json(50, 30, 20))
    draws = [i / 1000 for i in range(1000)]
    chosen = Counter(config.choose(None, r, None, frozenset({"v1"})).name for r in draws)
    assert chosen == {"v2": 600, "v3": 400}
    assert config.choose(None, 0.0, sticky, frozenset({"v1"})).name in {"v2", "v3"}
    # Nothing left to fall back on: the weighted choice stands (fail open).
    every = frozenset({"v1", "v2", "v3"})
    assert config.choose(None, 0.0, sticky, every) == config.choose(None, 0.0, sticky)
    # A pinned request goes where it is pinned, ejected or not.
    assert config.choose("v1", 0.5, sticky, frozenset({"v1"})).name == "v1"


def test_avoidance_keeps_the_other_variants_choices() -> None:
    """Draws that fell on v2 or v3 stay there when v1 is left out."""
    config = parse_router_config(variants_json(50, 30, 20))
    for i in range(1000):
        usual = config.choose(None, i / 1000).name
        if usual != "v1":
            assert config.choose(None, i / 1000, None, frozenset({"v1"})).name == usual
