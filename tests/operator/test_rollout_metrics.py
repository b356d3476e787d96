"""The direct metrics source: per-variant counts over a step's window from the router's own
/metrics text (rendered by the real RouterMetrics), counter deltas, resets, p99 from buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from modeldeploy_operator.rollout import VariantMetrics
from modeldeploy_operator.rollout_metrics import (
    Counters,
    WindowQuery,
    _quantile_ms,
    parse_router_counters,
    window_metrics,
)
from modeldeploy_operator.rollout_sources import DirectMetrics
from modeldeploy_server.router import RouterMetrics

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def traffic(metrics: RouterMetrics, variant: str, ok: int, failed: int, seconds: float) -> None:
    for _ in range(ok):
        metrics.observe(variant, 200, seconds)
    for _ in range(failed):
        metrics.observe(variant, 503, seconds)


def test_counters_are_read_from_the_routers_own_text() -> None:
    router = RouterMetrics()
    traffic(router, "v1", 90, 0, 0.004)
    traffic(router, "v2", 8, 2, 0.3)
    router.count_unrouted(503)
    router.observe("v1", 422, 0.004)  # the model could not run on these values: its failure
    router.observe("v1", 400, 0.004)  # a malformed request: the client's
    router.observe_shadow("v1", "v2", agree=False, difference=0.5)
    router.observe_shadow("v1", "v2", agree=True, difference=0.0)
    counters = parse_router_counters(router.render().decode())
    assert set(counters) == {"v1", "v2"}  # no variant: no one to blame
    assert (counters["v1"].requests, counters["v1"].errors) == (92, 1)
    assert (counters["v2"].requests, counters["v2"].errors) == (10, 2)
    assert (counters["v2"].shadow_compared, counters["v2"].shadow_disagreed) == (2, 1)
    assert counters["v2"].buckets[float("inf")] == 10


def test_probe_requests_are_read_apart_from_users() -> None:
    a = RouterMetrics()
    traffic(a, "v2", 3, 0, 0.004)
    a.observe_probe("v2", 200, 0.002)
    base = {"a": parse_router_counters(a.render().decode())}
    traffic(a, "v2", 2, 0, 0.004)
    for code in (200, 200, 200, 503):
        a.observe_probe("v2", code, 0.002)
    a.observe_probe("v1", 200, 0.002)
    counters = parse_router_counters(a.render().decode())
    probes = counters["v2"].probes
    assert counters["v2"].requests == 5
    assert probes is not None and (probes.requests, probes.errors) == (5, 1)
    got = window_metrics({"a": counters}, base, ("v1", "v2"))
    assert (got["v2"].requests, got["v2"].errors) == (2, 0)
    assert got["v2"].probes is not None and got["v1"].probes is not None
    assert (got["v2"].probes.requests, got["v2"].probes.errors) == (4, 1)
    assert (got["v1"].requests, got["v1"].probes.requests) == (0, 1)


def test_window_counts_are_deltas_summed_over_routers() -> None:
    a, b = RouterMetrics(), RouterMetrics()
    traffic(a, "v1", 50, 1, 0.004)
    base = {"a": parse_router_counters(a.render().decode())}
    traffic(a, "v1", 30, 3, 0.004)
    traffic(a, "v2", 10, 0, 0.004)
    traffic(b, "v2", 5, 5, 0.004)  # b started within the window: all of it counts
    current = {t: parse_router_counters(m.render().decode()) for t, m in (("a", a), ("b", b))}
    got = window_metrics(current, base, ("v1", "v2", "v3"))
    assert (got["v1"].requests, got["v1"].errors) == (33, 3)
    assert (got["v2"].requests, got["v2"].errors) == (20, 5)
    assert got["v3"] == VariantMetrics()


def test_a_router_restart_counts_from_zero() -> None:
    before = Counters(requests=100, errors=10, buckets={0.01: 90, float("inf"): 100})
    after = Counters(requests=7, errors=1, buckets={0.01: 7, float("inf"): 7})
    assert after.since(before) == after


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        ({0.01: 0, 0.1: 100, float("inf"): 100}, 10 + 90 * 0.99),  # within (0.01, 0.1]
        ({0.01: 100, 0.1: 100, float("inf"): 100}, 9.9),
        ({0.01: 50, 0.1: 50, float("inf"): 100}, 100.0),  # in +Inf: the largest finite bound
        ({0.01: 0, float("inf"): 0}, None),
    ],
)
def test_p99_is_estimated_as_histogram_quantile_does(
    buckets: dict[float, int], expected: float | None
) -> None:
    got = _quantile_ms(0.99, buckets)
    assert got == (None if expected is None else pytest.approx(expected))


def test_direct_source_takes_the_last_scrape_at_the_windows_start_as_baseline() -> None:
    router = RouterMetrics()
    url = "http://10.1.0.1:8080/metrics"
    source = DirectMetrics(fetch=lambda _: router.render().decode())

    def window(since: int, now: int) -> VariantMetrics:
        query = WindowQuery(
            "ml",
            "iris",
            ("v1",),
            T0 + timedelta(seconds=since),
            T0 + timedelta(seconds=now),
            (url,),
        )
        return source.window(query)["v1"]

    traffic(router, "v1", 40, 0, 0.004)
    # The reconcile that starts the step reads at its start: nothing in the window yet.
    assert window(0, 0).requests == 0
    traffic(router, "v1", 25, 5, 0.004)
    assert (window(0, 10).requests, window(0, 20).errors) == (30, 5)
    # A new window (the next step) begun at 20 s: its baseline is the read made at 20 s.
    traffic(router, "v1", 7, 0, 0.004)
    assert window(20, 30).requests == 7
    # An operator restarted mid-window knows nothing before its first read.
    fresh = DirectMetrics(fetch=lambda _: router.render().decode())
    query = WindowQuery("ml", "iris", ("v1",), T0, T0 + timedelta(seconds=40), (url,))
    assert fresh.window(query)["v1"].requests == 0
    traffic(router, "v1", 3, 0, 0.004)
    later = WindowQuery("ml", "iris", ("v1",), T0, T0 + timedelta(seconds=50), (url,))
    assert fresh.window(later)["v1"].requests == 3


def test_an_unreachable_router_is_left_out() -> None:
    def fetch(url: str) -> str:
        raise OSError("connection refused")

    query = WindowQuery("ml", "iris", ("v1",), T0, T0, ("http://10.1.0.9:8080/metrics",))
    assert DirectMetrics(fetch=fetch).window(query) == {"v1": VariantMetrics()}
