"""Records codec (`{"instances": [...]}` -> `{"predictions": [...]}`) and CSV in and out.

Pure: it maps rows to the model's inputs using the model's metadata, and outputs back to rows.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from modeldeploy_server.codec import (
    array_from_json,
    decode_infer_request,
    may_hold_booleans,
    parse_json,
    string_array,
)
from modeldeploy_server.errors import InvalidInput, MalformedRequest
from modeldeploy_server.metadata import V2_TO_NUMPY, DecodedTensor, ModelMetadata, TensorSpec

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
# The numeric fast path: the bytes of plain numbers, commas, spaces and line ends; no quote, so
# every line is one row and every comma a separator.
_PLAIN_NUMBER_BYTES = b"0123456789.eE+-, \r\n"
_FAST_DATATYPES = frozenset({"FP32", "FP64"})
# Below 2**53 a float64 holds every integer exactly.
_EXACT_INTEGERS = 2.0**53
_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY
_NEWLINE, _COMMA = ord("\n"), ord(",")


def _fit_rows(where: str, array: np.ndarray[Any, Any], rows: int, spec: TensorSpec) -> Any:
    """Give per-row values the input's rank: a scalar per row fits an input of shape [-1, 1]."""
    if array.ndim == len(spec.shape):
        return array
    trailing = spec.shape[1:]
    if -1 not in trailing and array.size == rows * math.prod(trailing):
        return array.reshape((rows, *trailing))
    raise InvalidInput(
        f"{where}: values of shape {list(array.shape[1:])} per row do not fit the input's "
        f"shape {list(spec.shape)}"
    )


def decode_instances(body: bytes, metadata: ModelMetadata) -> list[DecodedTensor]:
    """Map `instances` (lists of positional values or objects keyed by input) to input tensors."""
    document = parse_json(body)
    if not isinstance(document, dict) or not isinstance(document.get("instances"), list):
        raise MalformedRequest('request body must be an object with an "instances" list')
    return tensors_from_instances(document["instances"], metadata, may_hold_booleans(body))


def tensors_from_instances(
    instances: list[Any], metadata: ModelMetadata, may_hold_bool: bool = True
) -> list[DecodedTensor]:
    """The input tensors of parsed instances (the records endpoint and batch JSON lines)."""
    if not instances:
        raise MalformedRequest('"instances" must not be empty')
    specs = metadata.inputs
    columns: dict[str, list[Any]]
    if all(isinstance(instance, dict) for instance in instances):
        names = [spec.name for spec in specs]
        columns = {name: [] for name in names}
        for index, instance in enumerate(instances):
            if set(instance) != set(names):
                raise InvalidInput(f"instances[{index}] has keys {sorted(instance)}, need {names}")
            for name in names:
                columns[name].append(instance[name])
    elif all(isinstance(instance, list) for instance in instances):
        if len(specs) == 1:
            columns = {specs[0].name: instances}
        else:
            for index, instance in enumerate(instances):
                if len(instance) != len(specs):
                    raise InvalidInput(
                        f"instances[{index}] has {len(instance)} values, the model has "
                        f"{len(specs)} inputs {[spec.name for spec in specs]}"
                    )
            columns = {spec.name: [row[i] for row in instances] for i, spec in enumerate(specs)}
    else:
        raise MalformedRequest("instances must all be lists or all be objects")
    tensors = []
    for spec in specs:
        where = f"instances, input {spec.name!r}"
        array = array_from_json(
            where, spec.datatype, columns[spec.name], may_hold_bool=may_hold_bool
        )
        if spec.datatype == "BYTES":
            # Strings were flattened; recover the rows from the count per row, which must agree.
            counts = {1 if isinstance(v, str) else len(v) for v in columns[spec.name]}
            if len(counts) != 1:
                raise InvalidInput(f"{where}: instances hold different numbers of strings")
            array = array.reshape((len(instances), -1)) if array.size else array
        tensors.append(
            DecodedTensor(spec.name, spec.datatype, _fit_rows(where, array, len(instances), spec))
        )
    return tensors


def decode_example(example: Mapping[str, Any], metadata: ModelMetadata) -> list[DecodedTensor]:
    """The tensors of a warm-up example: a v2 request when it holds an `inputs` list of objects,
    else one records instance (a value per input)."""
    inputs = example.get("inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(entry, dict) for entry in inputs):
        return list(decode_infer_request(orjson.dumps(example)).inputs)
    return decode_instances(orjson.dumps({"instances": [example]}), metadata)


def encode_predictions(outputs: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
    """One prediction per row: the value of a single output, or an object keyed by output."""
    return orjson.dumps({"predictions": predictions(outputs)}, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_prediction_lines(outputs: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
    """JSON lines: each line one of the predictions `encode_predictions` lists."""
    if len(outputs) == 1:
        (array,) = outputs.values()
        if array.ndim in (1, 2) and len(array) and _is_number_array(array):
            # One output of numbers: one orjson call, its rows cut apart (no string can hold the
            # separator, and a row of rank <= 1 holds no nested list).
            document = orjson.dumps(np.ascontiguousarray(array), option=_NUMPY_JSON)[1:-1]
            if array.ndim == 1:
                return document.replace(b",", b"\n") + b"\n"
            return document.replace(b"],[", b"]\n[") + b"\n"
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    return b"".join(orjson.dumps(prediction, option=option) for prediction in predictions(outputs))


def predictions(outputs: Mapping[str, np.ndarray[Any, Any]]) -> Any:
    """The predictions, one per row, as orjson serializes them (with OPT_SERIALIZE_NUMPY)."""
    # orjson takes numpy arrays and float scalars, but not every integer scalar type (onnxruntime
    # returns np.longlong), so per-row integers and strings become Python values first.
    arrays = {
        name: (a.tolist() if a.dtype == object or (a.ndim == 1 and a.dtype.kind in "iub") else a)
        for name, a in outputs.items()
    }
    if len(arrays) == 1:
        (only,) = arrays.values()
        return only
    rows = len(next(iter(outputs.values())))
    return [{name: a[row] for name, a in arrays.items()} for row in range(rows)]


def _column_array(where: str, datatype: str, values: Sequence[str]) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        return string_array(values)
    if datatype == "BOOL":
        lowered = [value.strip().lower() for value in values]
        if not all(value in _TRUE or value in _FALSE for value in lowered):
            raise InvalidInput(f"{where}: BOOL values must be true/false/1/0")
        return np.array([value in _TRUE for value in lowered])
    # Numbers follow JSON's rules exactly (no NaN, no infinity, nothing that overflows a double,
    # and then the same datatype checks): the column is read as one JSON array.
    try:
        numbers = orjson.loads("[" + ",".join(values) + "]")
    except orjson.JSONDecodeError:
        numbers = None
    if numbers is None or len(numbers) != len(values):
        for row, value in enumerate(values, start=1):
            try:
                number = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(
                    f"{where}, data row {row}: {value!r} is not a JSON number ({exc.msg})"
                ) from None
            if type(number) not in (int, float, bool):
                raise InvalidInput(f"{where}, data row {row}: {value!r} is not a JSON number")
    return array_from_json(where, datatype, numbers)


def decode_csv(body: bytes, metadata: ModelMetadata) -> list[DecodedTensor]:
    """A header row then one row per instance; columns name the inputs, or are the features of
    a single input."""
    fast = _decode_numeric_csv(body, metadata)
    if fast is not None:
        return fast
    try:
        text = body.decode("utf-8-sig")
        table = [row for row in csv.reader(io.StringIO(text)) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MalformedRequest(f"request body is not UTF-8 CSV: {exc}") from None
    check_csv_text(text)
    if len(table) < 2:
        raise MalformedRequest("CSV needs a header row and at least one data row")
    header, rows = table[0], table[1:]
    for number, row in enumerate(rows, start=2):
        check_csv_fields(number, row, header)
    return tensors_from_csv(header, rows, metadata)


def _decode_numeric_csv(body: bytes, metadata: ModelMetadata) -> list[DecodedTensor] | None:
    """`decode_csv` for a plain header line and lines of plain numbers, or None."""
    head, newline, data = body.partition(b"\n")
    try:
        text = head.decode("utf-8-sig").removesuffix("\r")
    except UnicodeDecodeError:
        return None
    if not newline or not text.strip() or any(c in text for c in '"\r') or _CONTROL.search(text):
        return None
    header = text.split(",")
    return tensors_from_numeric_csv(header, data, data.count(b"\n", 0, -1) + 1, metadata)


def tensors_from_numeric_csv(
    header: Sequence[str], data: bytes, rows: int, metadata: ModelMetadata
) -> list[DecodedTensor] | None:
    """`tensors_from_csv` for `rows` lines of plain numbers (each but the last ending in a
    newline) and floating-point inputs, the whole block parsed in one call by the same JSON number
    rules; None wherever that could decide anything differently, and the caller takes the exact
    path, which also names what is wrong."""
    if any(spec.datatype not in _FAST_DATATYPES for spec in metadata.inputs):
        return None
    block = data.removesuffix(b"\n")
    if (
        not block
        or block.translate(None, _PLAIN_NUMBER_BYTES)
        or data.count(b"\r") != data.count(b"\r\n")
    ):
        return None
    table = _numeric_table(block, rows, len(header))
    if table is None:
        return None
    if not check_csv_header(header, metadata):
        spec = metadata.inputs[0]
        return [DecodedTensor(spec.name, spec.datatype, table.astype(V2_TO_NUMPY[spec.datatype]))]
    tensors = []
    for spec in metadata.inputs:
        column = table[:, header.index(spec.name)].astype(V2_TO_NUMPY[spec.datatype])
        where = f"CSV column {spec.name!r}"
        column = _fit_rows(where, column, rows, spec)
        tensors.append(DecodedTensor(spec.name, spec.datatype, column))
    return tensors


def _numeric_table(block: bytes, rows: int, columns: int) -> np.ndarray[Any, Any] | None:
    """The numbers of `rows` lines of `columns` plain numbers each as float64, or None."""
    byte_values = np.frombuffer(block, np.uint8)
    line_ends = np.flatnonzero(byte_values == _NEWLINE)
    commas = np.flatnonzero(byte_values == _COMMA)
    if len(line_ends) != rows - 1 or len(commas) != rows * (columns - 1):
        return None
    if columns > 1:
        # With as many commas as the lines need, every line has its share when each line's
        # share (in order) lies within it.
        shares = commas.reshape((rows, columns - 1))
        if np.any(shares[1:, 0] < line_ends) or np.any(shares[:-1, -1] > line_ends):
            return None  # lines of other lengths
    # One flat JSON array: orjson reads it ~8x faster than a list of rows.
    try:
        numbers = orjson.loads(b"[" + block.replace(b"\n", b",") + b"]")
        if len(numbers) != rows * columns:
            return None
        table = np.fromiter(numbers, np.float64, len(numbers))
    except (orjson.JSONDecodeError, OverflowError):
        return None
    if not np.abs(table).max() < _EXACT_INTEGERS:
        # Beyond the integers a float64 holds exactly (an integer alone would round once, to the
        # input's type), and so also beyond the float types' range checks.
        return None
    return table.reshape((rows, columns))


def check_csv_text(text: str, where: str = "request body") -> None:
    """CSV text holds no control characters but the ones a quoted field may hold."""
    control = _CONTROL.search(text)
    if control is not None:
        # JSON refuses unescaped control characters in its strings; CSV has no escapes, so only
        # the ones a quoted field may hold (tab, CR, LF) are allowed.
        raise MalformedRequest(
            f"{where} is not UTF-8 CSV: control character {control.group()!r} at "
            f"character {control.start()}"
        )


def check_csv_fields(line: int, row: Sequence[str], header: Sequence[str]) -> None:
    """A data row has as many fields as the header."""
    if len(row) != len(header):
        raise MalformedRequest(f"CSV line {line} has {len(row)} fields, header has {len(header)}")


def check_csv_header(header: Sequence[str], metadata: ModelMetadata) -> bool:
    """Whether the columns name the inputs (True) or are the features of a single input (False);
    raises InvalidInput when they are neither."""
    specs = metadata.inputs
    names = [spec.name for spec in specs]
    if sorted(header) == sorted(names):
        return True
    if len(specs) == 1 and len(specs[0].shape) == 2 and specs[0].shape[1] in (-1, len(header)):
        return False
    raise InvalidInput(
        f"CSV columns {list(header)} do not match the model's inputs {names} (name them, or "
        "give the features of a single input)"
    )


def tensors_from_csv(
    header: Sequence[str], rows: Sequence[Sequence[str]], metadata: ModelMetadata
) -> list[DecodedTensor]:
    """The input tensors of parsed CSV rows, each as long as the header (the records endpoint
    and batch CSV)."""
    columns = list(zip(*rows, strict=True))
    if check_csv_header(header, metadata):
        tensors = []
        for spec in metadata.inputs:
            where = f"CSV column {spec.name!r}"
            array = _column_array(where, spec.datatype, columns[header.index(spec.name)])
            tensors.append(
                DecodedTensor(spec.name, spec.datatype, _fit_rows(where, array, len(rows), spec))
            )
        return tensors
    spec = metadata.inputs[0]
    arrays = [
        _column_array(f"CSV column {name!r}", spec.datatype, column)
        for name, column in zip(header, columns, strict=True)
    ]
    return [DecodedTensor(spec.name, spec.datatype, np.stack(arrays, axis=1))]


def encode_csv(outputs: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
    """A header row then one row per instance; an output with more values per row becomes
    columns NAME_0, NAME_1, ... Numbers are spelled as in the JSON answers."""
    header: list[str] = []
    blocks: list[np.ndarray[Any, Any]] = []
    for name, array in outputs.items():
        block = array.reshape((array.shape[0], -1)) if array.ndim else array.reshape((1, 1))
        header.extend(
            [name] if block.shape[1] == 1 else [f"{name}_{i}" for i in range(block.shape[1])]
        )
        blocks.append(block)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    wide = [block for block in blocks if block.size]  # a block of no columns adds nothing
    if wide and all(_is_number_array(block) for block in wide):
        # Numbers need no quoting: orjson spells whole blocks, and their rows are joined as bytes.
        head = buffer.getvalue().encode()
        texts = [_number_rows(block) for block in wide]
        if len(texts) == 1:
            return head + texts[0].replace(b"],[", b"\n") + b"\n"
        lines = zip(*(text.split(b"],[") for text in texts), strict=True)
        return head + b"\n".join(map(b",".join, lines)) + b"\n"
    writer.writerows(np.concatenate([_strings(block) for block in blocks], axis=1).tolist())
    return buffer.getvalue().encode()


def _strings(block: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A block's values as strings, numbers spelled as in the JSON answers."""
    if not block.size or not _is_number_array(block):
        return block.astype(str)
    rows = _number_rows(block).decode().split("],[")
    return np.array([row.split(",") for row in rows])


def _is_number_array(array: np.ndarray[Any, Any]) -> bool:
    return array.dtype.kind in "iuf"


def _number_rows(block: np.ndarray[Any, Any]) -> bytes:
    """A 2-D block of numbers as JSON without its outer brackets: `1,2],[3,4`."""
    return orjson.dumps(np.ascontiguousarray(block), option=_NUMPY_JSON)[2:-2]
