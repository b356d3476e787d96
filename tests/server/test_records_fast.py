"""The records codec's fast paths (a block of plain numbers parsed in one call; whole output blocks
spelled by orjson) against its exact paths: the same tensors or the same refusal, the same text."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldeploy_server.errors import InvalidInput, ServerError
from modeldeploy_server.metadata import ModelMetadata, TensorSpec
from modeldeploy_server.records import (
    check_csv_fields,
    decode_csv,
    encode_csv,
    encode_prediction_lines,
    predictions,
    tensors_from_csv,
    tensors_from_numeric_csv,
)


def _metadata(*inputs: TensorSpec) -> ModelMetadata:
    return ModelMetadata("m", "1", "0" * 64, inputs, (), batch_axis=True)


FEATURES = _metadata(TensorSpec("input", "FP32", (-1, 3)))
NAMED = _metadata(
    TensorSpec("a", "FP32", (-1,)),
    TensorSpec("b", "FP64", (-1, 1)),
    TensorSpec("c", "FP32", (-1, 1)),
)
INTEGERS = _metadata(TensorSpec("input", "INT64", (-1, 3)))
# Columns in another order than the inputs; the last case's header fits neither form.
CASES = {
    "features": (FEATURES, ["x", "y", "z"]),
    "named": (NAMED, ["c", "a", "b"]),
    "neither": (NAMED, ["a", "b", "z"]),
}


def _outcome(tensors: Any) -> Any:
    return [(t.name, t.array.dtype.str, t.array.shape, t.array.tolist()) for t in tensors]


def _exact(header: list[str], data: bytes, metadata: ModelMetadata) -> Any:
    """The exact path's tensors, or its error."""
    try:
        rows = list(csv.reader(io.StringIO(data.decode()), strict=True))
        for number, row in enumerate(rows, start=2):
            check_csv_fields(number, row, header)
        return _outcome(tensors_from_csv(header, rows, metadata))
    except (ServerError, csv.Error, UnicodeDecodeError) as exc:
        return str(exc)


def _fast(header: list[str], data: bytes, metadata: ModelMetadata) -> Any:
    try:
        tensors = tensors_from_numeric_csv(header, data, _rows(data), metadata)
    except ServerError as exc:
        return str(exc)
    return None if tensors is None else _outcome(tensors)


def _rows(data: bytes) -> int:
    return data.removesuffix(b"\n").count(b"\n") + 1


NUMBER = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(lambda v: str(np.float32(v))),
    st.sampled_from(["1e400", "-0", "01", "+1", ".5", "1.", "1e", " 2", "3 ", "1 2", "", "--1"]),
)
LINE = st.lists(NUMBER, min_size=2, max_size=4).map(",".join)
ENDING = st.sampled_from(["\n", "\n", "\n", "\r\n", "\r", "\n\n"])


@settings(deadline=None)  # a loaded machine must not fail a test of correctness
@given(
    lines=st.lists(st.tuples(LINE, ENDING), min_size=1, max_size=5),
    case=st.sampled_from(sorted(CASES)),
    last_newline=st.booleans(),
)
def test_a_numeric_block_decodes_as_the_exact_path_or_not_at_all(
    lines: list[tuple[str, str]], case: str, last_newline: bool
) -> None:
    metadata, header = CASES[case]
    text = "".join(line + ending for line, ending in lines)
    data = (text if last_newline else text.rstrip("\r\n")).encode()
    fast = _fast(header, data, metadata)
    if fast is not None:
        assert fast == _exact(header, data, metadata)


@pytest.mark.parametrize("case", ["features", "named"])
@pytest.mark.parametrize(
    "data",
    [
        b"1,2.5,-3e-2\n4,5,6\n",
        b"1,2.5,-3e-2\r\n4,5,6\r\n",
        b"1,2.5,-3e-2\n4,5,6",
        b" 1 ,2, 3\n",
        b"9007199254740991,0,0\n",
        b"1,2,3\n",
    ],
)
def test_plain_numbers_take_the_fast_path(data: bytes, case: str) -> None:
    """The fast path is taken where it can be (else the test above would prove nothing)."""
    metadata, header = CASES[case]
    fast = _fast(header, data, metadata)
    assert fast is not None
    assert fast == _exact(header, data, metadata)


@pytest.mark.parametrize(
    "data",
    [
        b'1,2,"3"\n',  # quoted: the csv module's rules
        b"1,2,3\n\n4,5,6\n",  # a blank line
        b"1,2\n",  # ragged
        b"1,2,3,4\n",
        b"1,2\n3,4,5,6\n",  # ragged, with the right number of values in all
        b"1,2,3,4\n5,6\n",
        b"1,2,nan\n",
        b"1,2,true\n",
        b"1,2,1e400\n",
        b"1,2,1e39\n",  # beyond FP32: the exact path's range check names it
        b"1.5,2,9007199254740993\n",  # an integer a float64 table would round
        b"1,2,99999999999999999999\n",  # beyond int64
        b"1,2\r,3\n",  # a lone CR: JSON whitespace, a line end to the csv module
        b"1,2,\xc3\xa9\n",
        b"[1,2],3\n",
    ],
)
def test_anything_else_is_left_to_the_exact_path(data: bytes) -> None:
    metadata, header = CASES["features"]
    assert tensors_from_numeric_csv(header, data, _rows(data), metadata) is None


def test_only_floating_point_inputs_take_the_fast_path() -> None:
    assert tensors_from_numeric_csv(["x", "y", "z"], b"1,2,3\n", 1, INTEGERS) is None


@pytest.mark.parametrize(
    "body",
    [
        b"x,y,z\n1,2,3\n4.5,5,6e-3\n",
        b"\xef\xbb\xbfx,y,z\r\n1,2,3\r\n",
        b"a,b,z\n1,2,3\n",
        b"x,y,z\n1,2,3\n\n",
        b'"x",y,z\n1,2,3\n',
        b"x,y,z\n1,2,1e39\n",
        b"x,y\n1,2\n",
        b"x,y,z\n",
        b"x,y,z",
        b"\nx,y,z\n1,2,3\n",
        b" x,y,z \n1,2,3\n",
    ],
)
def test_decode_csv_answers_as_the_csv_module_path(body: bytes) -> None:
    """The CSV endpoint's decoder: the tensors or the error of the csv module's reading."""
    try:
        decoded = _outcome(decode_csv(body, FEATURES))
    except ServerError as exc:
        decoded = str(exc)
    table = [row for row in csv.reader(io.StringIO(body.decode("utf-8-sig"))) if row]
    try:
        if len(table) < 2:
            raise InvalidInput("CSV needs a header row and at least one data row")
        for number, row in enumerate(table[1:], start=2):
            check_csv_fields(number, row, table[0])
        expected = _outcome(tensors_from_csv(table[0], table[1:], FEATURES))
    except ServerError as exc:
        expected = str(exc)
    assert decoded == expected


OUTPUT_ARRAYS = st.sampled_from(
    [np.float32, np.float64, np.int64, np.int32, np.uint8, np.float16]
).flatmap(
    lambda dtype: st.integers(1, 3).flatmap(
        lambda width: st.lists(
            st.lists(
                st.floats(-6e4, 6e4, width=16 if dtype == np.float16 else 32)
                if np.dtype(dtype).kind == "f"
                else st.integers(0, 255),
                min_size=width,
                max_size=width,
            ),
            min_size=1,
            max_size=4,
        ).map(lambda rows: np.array(rows, dtype=dtype))
    )
)


def _spelled(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


@settings(deadline=None)  # a loaded machine must not fail a test of correctness
@given(arrays=st.lists(OUTPUT_ARRAYS, min_size=1, max_size=3), strings=st.booleans())
def test_csv_output_spells_numbers_as_json_and_quotes_strings(
    arrays: list[np.ndarray[Any, Any]], strings: bool
) -> None:
    rows = len(arrays[0])
    outputs = {
        f"o{i}": a[:rows] if len(a) >= rows else np.resize(a, (rows, a.shape[1]))
        for i, a in enumerate(arrays)
    }
    if strings:
        outputs["label"] = np.array([f'a,"b"\n{i}' for i in range(rows)], dtype=object)
    table = list(csv.reader(io.StringIO(encode_csv(outputs).decode())))
    expected_header: list[str] = []
    expected_rows: list[list[str]] = [[] for _ in range(rows)]
    for name, array in outputs.items():
        block = array.reshape((rows, -1))
        width = block.shape[1]
        expected_header += [name] if width == 1 else [f"{name}_{i}" for i in range(width)]
        for row, values in zip(expected_rows, block, strict=True):
            row += [v if isinstance(v, str) else _spelled(v) for v in values]
    assert table == [expected_header, *expected_rows]


@settings(deadline=None)  # a loaded machine must not fail a test of correctness
@given(array=OUTPUT_ARRAYS, flat=st.booleans())
def test_prediction_lines_of_one_output_are_the_lines_of_its_predictions(
    array: np.ndarray[Any, Any], flat: bool
) -> None:
    outputs = {"o": array[:, 0] if flat else array}
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    expected = b"".join(orjson.dumps(p, option=option) for p in predictions(outputs))
    assert encode_prediction_lines(outputs) == expected
