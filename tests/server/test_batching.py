"""Batch planning, merging and splitting on their own."""

from __future__ import annotations

import numpy as np
import pytest

from modeldeploy_server.batching import merge_feeds, merge_key, plan_batches, split_outputs


def feed(rows: int, start: float = 0.0, width: int = 4) -> dict[str, np.ndarray]:
    values = np.arange(rows * width, dtype=np.float32).reshape(rows, width) + start
    return {"input": values}


@pytest.mark.parametrize(
    ("keys", "rows", "limit", "expected"),
    [
        ("aaaa", [1, 1, 1, 1], 64, [[0, 1, 2, 3]]),
        ("aaaa", [30, 30, 30, 30], 64, [[0, 1], [2, 3]]),
        ("abab", [1, 1, 1, 1], 64, [[0, 2], [1, 3]]),
        ("aaa", [100, 1, 1], 64, [[0], [1, 2]]),
        ("aaa", [1, 100, 1], 64, [[0, 2], [1]]),
        ("a", [1], 1, [[0]]),
    ],
)
def test_plan_groups_compatible_requests_up_to_the_row_limit(
    keys: str, rows: list[int], limit: int, expected: list[list[int]]
) -> None:
    assert plan_batches(list(keys), rows, limit) == expected


def test_merge_key_separates_shapes_and_dtypes_but_not_batch_size() -> None:
    assert merge_key(feed(1)) == merge_key(feed(7))
    assert merge_key(feed(1)) != merge_key(feed(1, width=5))
    assert merge_key(feed(1)) != merge_key({"input": np.zeros((1, 4), dtype=np.float64)})


def test_merge_then_split_gives_each_request_its_own_rows() -> None:
    feeds = [feed(1, 0), feed(3, 100), feed(2, 200)]
    merged = merge_feeds(feeds)
    assert merged["input"].shape == (6, 4)
    outputs = {
        "label": merged["input"][:, 0].astype(np.int64),
        "probabilities": merged["input"] * 2,
    }
    parts = split_outputs(outputs, [1, 3, 2])
    for part, original in zip(parts, feeds, strict=True):
        np.testing.assert_array_equal(part["probabilities"], original["input"] * 2)
        np.testing.assert_array_equal(part["label"], original["input"][:, 0])


def test_split_refuses_outputs_that_are_not_per_row() -> None:
    with pytest.raises(ValueError, match="expected 3 rows"):
        split_outputs({"total": np.zeros(1)}, [1, 2])
