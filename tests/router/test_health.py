"""Passive health: ejection for a short, growing time, reset by a success (clock passed in)."""

from __future__ import annotations

from modeldeploy_server.health import PassiveHealth


def test_failures_eject_for_a_growing_time_and_success_resets() -> None:
    health = PassiveHealth(first_s=1.0, max_s=5.0)
    assert health.ejected(0.0) == frozenset()
    assert health.record_failure("v1", 10.0) == 1.0
    assert health.ejected(10.5) == {"v1"}
    assert health.is_ejected("v1", 10.5)
    # Requests that were in flight when it failed do not lengthen the ejection.
    assert health.record_failure("v1", 10.6) is None
    assert health.ejected(11.0) == frozenset()
    assert not health.is_ejected("v1", 11.0)
    # It failed again when tried after the ejection: twice as long, then capped.
    assert health.record_failure("v1", 11.1) == 2.0
    assert health.ejected(13.0) == {"v1"}
    assert health.record_failure("v1", 13.2) == 4.0
    assert health.record_failure("v1", 17.3) == 5.0
    health.record_success("v1")
    assert health.record_failure("v1", 30.0) == 1.0


def test_variants_are_ejected_independently() -> None:
    health = PassiveHealth()
    health.record_failure("v1", 0.0)
    health.record_failure("v2", 0.5)
    assert health.ejected(0.9) == {"v1", "v2"}
    assert health.ejected(1.2) == {"v2"}
    health.record_success("v2")  # an answer from a request sent before the ejection
    assert health.ejected(1.2) == {"v2"}
    assert health.ejected(1.6) == frozenset()
