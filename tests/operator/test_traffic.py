"""compute_effective_weights: only ready variants get traffic, integers summing to 100."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeldeploy_operator.traffic import compute_effective_weights

CASES = [
    ("all ready keeps the split", [("v1", 90), ("v2", 10)], {"v1", "v2"}, [90, 10]),
    ("not-ready share moves", [("v1", 90), ("v2", 10)], {"v1"}, [100, 0]),
    ("the other way round", [("v1", 90), ("v2", 10)], {"v2"}, [0, 100]),
    ("proportional, rounded", [("a", 50), ("b", 25), ("c", 25)], {"a", "c"}, [67, 0, 33]),
    ("thirds: tie goes to the first", [("a", 34), ("b", 33), ("c", 33)], {"b", "c"}, [0, 50, 50]),
    ("nothing ready: no traffic", [("v1", 90), ("v2", 10)], set(), [0, 0]),
    ("dark launch stays dark", [("v1", 100), ("v2", 0)], {"v2"}, [0, 0]),
    ("dark launch ready, live ready", [("v1", 100), ("v2", 0)], {"v1", "v2"}, [100, 0]),
    (
        "leftover point to the largest remainder",
        [(f"v{i}", w) for i, w in enumerate([10, 10, 10, 10, 20, 20, 20])],
        {"v0", "v1", "v2", "v4", "v5", "v6"},
        [11, 11, 11, 0, 23, 22, 22],
    ),
]


@pytest.mark.parametrize(
    ("weights", "ready", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_effective_weights(
    weights: list[tuple[str, int]], ready: set[str], expected: list[int]
) -> None:
    result = compute_effective_weights(weights, ready)
    assert list(result) == [name for name, _ in weights]  # spec order is kept
    assert list(result.values()) == expected


@st.composite
def splits(draw: st.DrawFn) -> tuple[list[tuple[str, int]], set[str]]:
    count = draw(st.integers(1, 8))
    cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=count - 1, max_size=count - 1)))
    bounds = [0, *cuts, 100]
    weights = [(f"v{i}", bounds[i + 1] - bounds[i]) for i in range(count)]
    ready = draw(st.sets(st.sampled_from([name for name, _ in weights])))
    return weights, ready


@given(splits())
def test_sum_is_100_and_only_ready_live_variants_get_traffic(
    case: tuple[list[tuple[str, int]], set[str]],
) -> None:
    weights, ready = case
    result = compute_effective_weights(weights, ready)
    live = [name for name, weight in weights if weight > 0 and name in ready]
    assert sum(result.values()) == (100 if live else 0)
    assert all(result[name] == 0 for name, weight in weights if name not in live)
    # Rounding never moves more than one point away from the exact proportional share.
    total = sum(weight for name, weight in weights if name in live)
    for name, weight in weights:
        if name in live:
            assert abs(result[name] - weight * 100 / total) < 1
