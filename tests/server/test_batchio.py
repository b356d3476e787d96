"""The pure part of batch predictions: shards, chunks, decoding with bad rows, part encoding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldeploy_server.batchio import (
    BatchError,
    Chunk,
    PartEncoder,
    Shard,
    ShardChunker,
    decode_chunk,
    parse_csv_header,
    parse_shard,
    progress_line,
    shard_bounds,
)
from modeldeploy_server.metadata import ModelMetadata, TensorSpec

IRIS = ModelMetadata(
    name="iris",
    version="1",
    sha256="0" * 64,
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("label", "INT64", (-1,)),),
    batch_axis=True,
)


@pytest.mark.parametrize("value", ["0/1", "3/4", " 1/2 "])
def test_parse_shard_accepts_index_of_count(value: str) -> None:
    shard = parse_shard(value)
    assert 0 <= shard.index < shard.count


@pytest.mark.parametrize("value", ["4/4", "1", "-1/2", "a/b", "0/0", "1/2/3"])
def test_parse_shard_refuses_anything_else(value: str) -> None:
    with pytest.raises(ValueError, match="I/N"):
        parse_shard(value)


def test_shard_names_sort_in_input_order() -> None:
    assert Shard(2, 12).name == "part-00002-of-00012"


@settings(deadline=None)  # a loaded machine must not fail a test of correctness
@given(
    lines=st.lists(
        st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=40
    ),
    count=st.integers(1, 9),
    header=st.booleans(),
    rows=st.integers(1, 5),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_shards_partition_the_data_lines_in_order(
    lines: list[bytes], count: int, header: bool, rows: int, cuts: list[int]
) -> None:
    """Whatever blocks the lines arrive in, the shards' chunks hold every non-blank data line
    once, in order, with its line number, `rows` at most per chunk."""
    first = 1 if header and lines else 0
    data_start = sum(map(len, lines[:first]))
    size = sum(map(len, lines))
    edges = sorted({first, len(lines), *(min(max(cut, first), len(lines)) for cut in cuts)})
    blocks = [lines[a:b] for a, b in itertools.pairwise(edges) if a < b]
    seen: list[tuple[int, bytes]] = []
    any_data = False
    for index in range(count):
        bounds = shard_bounds(data_start, size, Shard(index, count))
        chunker = ShardChunker(bounds, rows, first + 1, data_start)
        for chunk in chunker.chunks(iter(blocks)):
            assert 1 <= len(chunk.lines) <= rows
            seen.extend(chunk.numbered())
        any_data = chunker.data_lines
    expected = [(n, line) for n, line in enumerate(lines, 1) if n > first and line.strip()]
    assert seen == expected
    assert any_data == bool(expected)


def test_csv_header_is_checked_against_the_model() -> None:
    assert parse_csv_header(b"a,b,c,d\r\n", IRIS) == ["a", "b", "c", "d"]
    with pytest.raises(BatchError, match="line 1: CSV columns"):
        parse_csv_header(b"a,b,c\n", IRIS)
    with pytest.raises(BatchError, match="line 1: the CSV header is not UTF-8"):
        parse_csv_header(b"\xff,b\n", IRIS)


def test_a_bad_row_is_found_and_the_others_still_form_one_feed() -> None:
    lines = [b"1,2,3,4\n", b"1,x,3,4\n", b"5,6,7,8\n", b"\xff\n"]
    decoded = decode_chunk(Chunk(range(2, 6), lines), "csv", ["a", "b", "c", "d"], IRIS)
    assert decoded.lines == [2, 4]
    assert [(row.line, row.reason) for row in decoded.skipped] == [
        (
            3,
            "CSV column 'b', data row 1: 'x' is not a JSON number (unexpected character, "
            "expected a JSON value)",
        ),
        (5, "not UTF-8"),
    ]
    np.testing.assert_array_equal(decoded.feed["input"], [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_json_lines_of_lists_and_objects_mixed_decode_row_by_row() -> None:
    meta = ModelMetadata(
        "m",
        "1",
        "0" * 64,
        (TensorSpec("x", "INT64", (-1, 1)), TensorSpec("y", "INT64", (-1, 1))),
        (),
        batch_axis=True,
    )
    lines = [b"[1, 2]\n", b'{"x": 3, "y": 4}\n', b"7\n"]
    decoded = decode_chunk(Chunk(range(1, 4), lines), "jsonl", [], meta)
    assert decoded.lines == [1, 2]
    assert decoded.skipped[0].line == 3
    assert "instance" in decoded.skipped[0].reason
    np.testing.assert_array_equal(decoded.feed["y"], [[2], [4]])


def test_part_encoder_writes_the_csv_header_once_and_refuses_a_changed_one() -> None:
    encoder = PartEncoder("csv")
    first = encoder.encode({"p": np.array([[0.5, 0.5]], dtype=np.float32)})
    second = encoder.encode({"p": np.array([[0.25, 0.75]], dtype=np.float32)})
    assert first + second == b"p_0,p_1\n0.5,0.5\n0.25,0.75\n"
    with pytest.raises(BatchError, match="changed shape"):
        encoder.encode({"p": np.array([[1.0]], dtype=np.float32)})


def test_progress_line_shows_rate_and_eta() -> None:
    assert progress_line(1_000_000, 10.0, 0.25) == "rows 1,000,000  100,000 rows/s  ETA 0:00:30"
    assert progress_line(5, 0.0, None) == "rows 5  0 rows/s"
