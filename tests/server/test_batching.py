"""Batch planning, merging and splitting on their own."""

from __future__ import annotations

import numpy as np
import pytest

from modeldeploy_server.batching import (
    answers_row_by_row,
    merge_feeds,
    merge_key,
    plan_batches,
    shifted,
    split_outputs,
)
from modeldeploy_server.errors import InvalidInput
from modeldeploy_server.metadata import DecodedTensor, ModelMetadata, TensorSpec, validate_inputs


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


def test_a_request_whose_inputs_differ_in_rows_merges_with_nothing() -> None:
    ragged = {"x": np.zeros((5, 4)), "indices": np.zeros(2, dtype=np.int64)}
    assert merge_key(ragged) != merge_key(ragged)


def two_inputs(named: bool) -> ModelMetadata:
    return ModelMetadata(
        "gather",
        "1",
        "0" * 64,
        (TensorSpec("x", "FP32", (-1, 4)), TensorSpec("indices", "INT64", (-1,))),
        (TensorSpec("y", "FP32", (-1, 4)),),
        batch_axis=True,
        batch_axis_named=named,
    )


def test_only_a_named_batch_axis_makes_inputs_agree_on_it() -> None:
    tensors = [
        DecodedTensor("x", "FP32", np.zeros((5, 4), dtype=np.float32)),
        DecodedTensor("indices", "INT64", np.zeros(2, dtype=np.int64)),
    ]
    # Unnamed (x[?, 4], indices[?]): nothing ties the sizes; the larger counts for the limit.
    assert validate_inputs(tensors, two_inputs(named=False), 5)[1] == 5
    assert not two_inputs(named=False).uniform
    with pytest.raises(InvalidInput, match="inputs disagree on the batch dimension"):
        validate_inputs(tensors, two_inputs(named=True), 5)
    assert two_inputs(named=True).uniform


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


def test_a_merged_probe_tells_row_by_row_models_from_the_others() -> None:
    first = {"x": np.zeros((1, 4), np.float32), "indices": np.zeros(1, np.int64)}
    second = shifted(first)
    assert second["x"].tolist() == [[1.0] * 4] and second["indices"] is first["indices"]
    together = merge_feeds([first, second])
    row_by_row = {"y": together["x"] * 2}
    assert answers_row_by_row(row_by_row, {"y": first["x"] * 2}, {"y": second["x"] * 2})
    # Gather with row numbers: together, the second request's index 0 reads the first one's row.
    gathered = {"y": together["x"][together["indices"]]}
    apart = ({"y": first["x"][first["indices"]]}, {"y": second["x"][second["indices"]]})
    assert not answers_row_by_row(gathered, *apart)
    centred = {"y": together["x"] - together["x"].mean(axis=0)}
    assert not answers_row_by_row(centred, {"y": first["x"] * 0}, {"y": second["x"] * 0})
