"""Effective traffic weights: the spec's split, restricted to the variants that can answer."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def compute_effective_weights(
    weights: Sequence[tuple[str, int]], ready: Collection[str]
) -> dict[str, int]:
    """Give each not-ready variant's share to the ready ones, proportionally (integers, sum 100).

    When no ready variant has a positive weight (nothing ready, or only dark launches ready), every
    weight is 0: the router then answers 503 at once instead of sending requests to backends that
    cannot answer, and a dark launch is never promoted to live traffic by an outage elsewhere.
    Rounding uses largest remainders, ties going to the variant listed first, so the result is
    deterministic and a fully ready 90/10 split stays exactly 90/10.
    """
    live = [(name, weight) for name, weight in weights if name in ready and weight > 0]
    total = sum(weight for _, weight in live)
    effective = dict.fromkeys((name for name, _ in weights), 0)
    if total == 0:
        return effective
    remainders: list[tuple[int, int, str]] = []
    for order, (name, weight) in enumerate(live):
        share, remainder = divmod(weight * 100, total)
        effective[name] = share
        remainders.append((-remainder, order, name))
    for _, _, name in sorted(remainders)[: 100 - sum(effective.values())]:
        effective[name] += 1
    return effective
