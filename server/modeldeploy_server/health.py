"""Passive health: a variant that fails is left out of weighted routing for a short, growing time.

Pure: the clock is passed in. A failure while a variant is already ejected (requests that were in
flight when it died) does not lengthen the ejection; the first failure after it ends (the next
request that tries the variant again) doubles it, and any success resets it.
"""

from __future__ import annotations

FIRST_EJECTION_S = 1.0
MAX_EJECTION_S = 30.0
_NONE: frozenset[str] = frozenset()


class PassiveHealth:
    """Consecutive failures and ejection deadlines per variant name."""

    def __init__(self, first_s: float = FIRST_EJECTION_S, max_s: float = MAX_EJECTION_S) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._ejections: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def ejected(self, now: float) -> frozenset[str]:
        """The variants to leave out at `now`."""
        if not self._until:
            return _NONE
        for name in [n for n, until in self._until.items() if until <= now]:
            del self._until[name]
        return frozenset(self._until)

    def record_failure(self, name: str, now: float) -> float | None:
        """Count a failure; the ejection's length in seconds if it ejects the variant now."""
        until = self._until.get(name)
        if until is not None and until > now:
            return None
        count = self._ejections.get(name, 0)
        self._ejections[name] = count + 1
        seconds: float = min(self._first_s * 2.0**count, self._max_s)
        self._until[name] = now + seconds
        return seconds

    def record_success(self, name: str) -> None:
        """The variant answered: its next failure ejects it for the first, short time again."""
        if name in self._ejections:
            del self._ejections[name]

    def is_ejected(self, name: str, now: float) -> bool:
        """Whether `name` is left out at `now` (for the metric)."""
        until = self._until.get(name)
        return until is not None and until > now
