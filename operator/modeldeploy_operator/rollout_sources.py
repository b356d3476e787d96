"""The metrics sources a rollout reads (see rollout_metrics.py for the interface).

`DirectMetrics` scrapes the routers' own /metrics: it keeps, per ModelDeployment, the scrapes it
made (in memory) and answers a window with the counters now minus those of the last scrape made at
or before the window's start. The operator scrapes on every reconcile of an active rollout,
including the one that starts a step, so a window's baseline is read when it begins. After an
operator restart nothing earlier is known: the first scrape is the baseline, the window counts
from then on (fewer samples, never wrong ones: a step short of samples is Inconclusive, and
silence never promotes by default).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime

from modeldeploy_operator.rollout import VariantMetrics
from modeldeploy_operator.rollout_metrics import (
    Counters,
    WindowQuery,
    parse_router_counters,
    window_metrics,
)

SCRAPE_TIMEOUT_S = 5.0
log = logging.getLogger("modeldeploy_operator")
Scrape = tuple[datetime, dict[str, dict[str, Counters]]]  # (when, target -> variant -> counters)


def http_get(url: str) -> str:
    """GET `url` (a router's /metrics) as text."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return str(response.read().decode("utf-8"))


class DirectMetrics:
    """Step windows from the routers' counters, scraped by the operator itself."""

    def __init__(self, fetch: Callable[[str], str] = http_get) -> None:
        self._fetch = fetch
        self._scrapes: dict[tuple[str, str], list[Scrape]] = {}

    def window(self, query: WindowQuery) -> Mapping[str, VariantMetrics]:
        current: dict[str, dict[str, Counters]] = {}
        for target in query.targets:
            try:
                current[target] = parse_router_counters(self._fetch(target))
            except (OSError, ValueError) as error:
                log.warning(f"[{query.namespace}/{query.name}] cannot read {target}: {error}")
        key = (query.namespace, query.name)
        scrapes = self._scrapes.setdefault(key, [])
        earlier = [s for s in scrapes if s[0] <= query.since]
        base = earlier[-1] if earlier else (scrapes[0] if scrapes else (query.now, current))
        # Keep the baseline and what came after it: a later window starts no earlier.
        kept = [s for s in scrapes if s[0] >= base[0]]
        self._scrapes[key] = [*kept, (query.now, current)][-64:]
        return window_metrics(current, base[1], query.variants)

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept for a ModelDeployment that is gone."""
        self._scrapes.pop((namespace, name), None)
