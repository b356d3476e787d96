"""Open Inference Protocol v2 REST codec: JSON (and the binary tensor extension) <-> numpy.

Pure: bytes in, plain data out and back; no HTTP, no onnxruntime.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from modeldeploy_server.errors import InvalidInput, MalformedRequest
from modeldeploy_server.metadata import NUMPY_TO_V2, V2_TO_NUMPY, DecodedTensor

MAX_RANK = 32
# numpy kinds a JSON array may parse to, per target kind: JSON integers are fine for floats, but
# floats are not fine for integers (no silent truncation) and only true/false are booleans.
_ACCEPTED_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
_LENGTH_PREFIX = struct.Struct("<I")
_FLOAT_MAX = {name: float(np.finfo(V2_TO_NUMPY[name]).max) for name in ("FP16", "FP32")}
SMALL = 64
_NO_BINARY = memoryview(b"")


@dataclass(slots=True)
class RequestedOutput:
    """An entry of the request's `outputs`: which output, and whether to send it as binary."""

    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    """A decoded v2 inference request."""

    id: str | None
    inputs: tuple[DecodedTensor, ...]
    outputs: tuple[RequestedOutput, ...]
    binary_output: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def parse_json(body: bytes | memoryview, where: str = "request body") -> Any:
    """orjson.loads with the protocol's error."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"{where} is not valid UTF-8 JSON: {exc}") from None


def may_hold_booleans(json_text: bytes | memoryview) -> bool:
    """Whether a JSON text has a true or false token anywhere: when it has none, no value can be a
    boolean and the per-value check is skipped (a byte search costs ~1 ns per 16 bytes, the
    check ~20 ns per value)."""
    text = json_text if isinstance(json_text, bytes) else json_text.tobytes()
    # find() rather than `in`, which first tries the needle as an int (a TypeError raised and
    # cleared on every call).
    return text.find(b"true") >= 0 or text.find(b"false") >= 0


def array_from_json(
    where: str, datatype: str, data: Any, *, may_hold_bool: bool = True
) -> np.ndarray[Any, Any]:
    """Convert JSON data (flat or nested lists) to an array of the datatype, strictly."""
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BYTES":
        return _strings_from_json(where, data)
    try:
        parsed = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"{where}: data is not a rectangular array of numbers") from None
    if dtype.kind in "iu" and parsed.dtype.kind in "fO":
        # Integers beyond int64 (valid for UINT64) make numpy infer float64 or object.
        exact = np.asarray(data, dtype=object)
        if all(type(value) is int for value in exact.flat):
            try:
                return np.array(data, dtype=dtype)
            except OverflowError:
                raise InvalidInput(f"{where}: a value is out of range for {datatype}") from None
    if parsed.size and may_hold_bool and dtype.kind != "b" and _holds_bool(data, parsed.ndim):
        raise InvalidInput(f"{where}: data does not hold {datatype} values")
    if (
        dtype.kind == "f"
        and parsed.dtype.kind == "f"
        and dtype.itemsize < parsed.dtype.itemsize
        and parsed.ndim == 1
        and 0 < parsed.size <= SMALL
    ):
        # Small flat lists: builtin max/min cost far less than entering np.errstate.
        largest = _FLOAT_MAX[datatype]
        if max(data) > largest or min(data) < -largest:
            raise InvalidInput(f"{where}: a value is out of range for {datatype}")
        return parsed.astype(dtype)
    return cast_array(where, datatype, parsed)


def accepts_kind(datatype: str, dtype: np.dtype[Any]) -> bool:
    """Whether values of `dtype` may become the (non-BYTES) datatype's: see cast_array."""
    return dtype.kind in _ACCEPTED_KINDS[V2_TO_NUMPY[datatype].kind]


def cast_array(where: str, datatype: str, parsed: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A numeric array as the datatype, strictly: the same kinds only (ints may become floats,
    never the reverse; bool only from bool) and no value out of the datatype's range."""
    dtype = V2_TO_NUMPY[datatype]
    if parsed.size:
        if not accepts_kind(datatype, parsed.dtype):
            raise InvalidInput(f"{where}: data does not hold {datatype} values")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            if parsed.min() < info.min or parsed.max() > info.max:
                raise InvalidInput(f"{where}: a value is out of range for {datatype}")
    if dtype.kind == "f" and parsed.dtype.kind == "f" and dtype.itemsize < parsed.dtype.itemsize:
        with np.errstate(over="raise"):
            try:
                return parsed.astype(dtype)
            except FloatingPointError:
                raise InvalidInput(f"{where}: a value is out of range for {datatype}") from None
    return parsed.astype(dtype, copy=False)


def string_array(items: Sequence[str]) -> np.ndarray[Any, Any]:
    """A flat BYTES tensor: an object array of the strings."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _holds_bool(data: Any, ndim: int) -> bool:
    # numpy reads true and false among numbers as 1 and 0, so only the JSON values can tell.
    # The array parsed, so every value stands at depth ndim; chain and map(type) stay in C.
    values = data if ndim else [data]
    for _ in range(ndim - 1):
        values = itertools.chain.from_iterable(values)
    return bool in map(type, values)


def _strings_from_json(where: str, data: Any) -> np.ndarray[Any, Any]:
    # Walk nested lists without recursion so that deep nesting cannot overflow the stack.
    flat: list[str] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            flat.append(item)
        elif isinstance(item, list) and depth < MAX_RANK:
            stack.extend((child, depth + 1) for child in reversed(item))
        else:
            raise InvalidInput(f"{where}: BYTES data must be (lists of) strings")
    return string_array(flat)


def _parameters(container: dict[str, Any], where: str, suffix: str) -> dict[str, Any]:
    parameters = container.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise MalformedRequest(f"{where}{suffix} must be an object")
    return parameters


def _all_sizes(dims: list[Any]) -> bool:
    # A loop, not all() over a generator: this runs for every input of every request.
    for dim in dims:  # noqa: SIM110
        if type(dim) is not int or dim < 0:
            return False
    return True


def _shape_from_json(where: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_RANK or not _all_sizes(raw):
        raise InvalidInput(f"{where}: shape must be a list of at most {MAX_RANK} integers >= 0")
    return tuple(raw)


def _decode_input(
    index: int, entry: Any, binary: memoryview, offset: int, may_hold_bool: bool
) -> tuple[DecodedTensor, int]:
    if not isinstance(entry, dict):
        raise MalformedRequest(f"inputs[{index}] must be an object")
    name, datatype = entry.get("name"), entry.get("datatype")
    if not isinstance(name, str) or not name:
        raise MalformedRequest(f"inputs[{index}].name must be a non-empty string")
    where = f"input {name!r}"
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise InvalidInput(f"{where}: datatype must be one of {list(V2_TO_NUMPY)}")
    shape = _shape_from_json(where, entry.get("shape"))
    count = math.prod(shape)
    parameters = _parameters(entry, where, ": parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise MalformedRequest(f"{where}: binary_data_size does not fit the binary section")
        array = _array_from_binary(where, datatype, binary[offset : offset + size], count)
        offset += size
    elif "data" in entry:
        array = array_from_json(where, datatype, entry["data"], may_hold_bool=may_hold_bool)
    else:
        raise MalformedRequest(f"{where} has no data")
    if array.size != count:
        raise InvalidInput(
            f"{where}: shape {list(shape)} needs {count} values, data has {array.size}"
        )
    return DecodedTensor(name, datatype, array.reshape(shape)), offset


def _array_from_binary(
    where: str, datatype: str, raw: memoryview, count: int
) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        items: list[str] = []
        position = 0
        try:
            while position < len(raw):
                (length,) = _LENGTH_PREFIX.unpack_from(raw, position)
                position += 4
                if position + length > len(raw):
                    raise ValueError
                items.append(str(raw[position : position + length], "utf-8"))
                position += length
        except (struct.error, ValueError):
            raise InvalidInput(f"{where}: binary BYTES data is not length-prefixed UTF-8") from None
        return string_array(items)
    dtype = V2_TO_NUMPY[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"{where}: binary data has {len(raw)} bytes, the shape needs {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        flags: np.ndarray[Any, Any] = np.frombuffer(raw, dtype=np.uint8) != 0
        return flags
    # A copy: the body's buffer is read-only and not necessarily aligned.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _decode_outputs(raw: Any) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise MalformedRequest("outputs must be a list")
    outputs = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise MalformedRequest(f"outputs[{index}] must be an object with a string name")
        parameters = _parameters(entry, f"outputs[{index}]", ".parameters")
        outputs.append(RequestedOutput(entry["name"], parameters.get("binary_data") is True))
    return tuple(outputs)


def decode_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decode a v2 request; with header_length, the body is JSON then binary tensor data."""
    header: bytes | memoryview = body
    binary = _NO_BINARY
    if header_length is not None and 0 < header_length <= len(body):
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    elif header_length is not None:
        raise MalformedRequest("Inference-Header-Content-Length does not fit the body")
    document = parse_json(header)
    if not isinstance(document, dict):
        raise MalformedRequest("request body must be a JSON object")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise MalformedRequest("id must be a string")
    parameters = _parameters(document, "", "parameters")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        # Empty only fits a model without inputs; validation names what any other one misses.
        raise MalformedRequest("inputs must be a list")
    inputs = []
    offset = 0
    may_hold_bool = may_hold_booleans(header)
    for index, entry in enumerate(raw_inputs):
        tensor, offset = _decode_input(index, entry, binary, offset, may_hold_bool)
        inputs.append(tensor)
    if offset != len(binary):
        raise MalformedRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(
        id=request_id,
        inputs=tuple(inputs),
        outputs=_decode_outputs(document.get("outputs")),
        binary_output=parameters.get("binary_data_output") is True,
        parameters=parameters,
    )


def select_outputs(request: InferRequest, output_names: Sequence[str]) -> list[tuple[str, bool]]:
    """The (name, binary) outputs to answer with: the requested subset, or all of them."""
    if not request.outputs:
        return [(name, request.binary_output) for name in output_names]
    for requested in request.outputs:
        if requested.name not in output_names:
            raise InvalidInput(
                f"unknown output {requested.name!r}; the model's outputs are {list(output_names)}"
            )
    return [(requested.name, requested.binary) for requested in request.outputs]


def _binary_bytes(array: np.ndarray[Any, Any]) -> bytes:
    if array.dtype == object:
        encoded = [str(item).encode() for item in array.reshape(-1)]
        return b"".join(_LENGTH_PREFIX.pack(len(item)) + item for item in encoded)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
) -> tuple[bytes, int | None]:
    """Encode a v2 response; returns the body and, when some output is binary, the JSON length."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, binary in outputs:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": NUMPY_TO_V2[array.dtype],
            "shape": list(array.shape),
        }
        if binary:
            chunk = _binary_bytes(array)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            flat = array.reshape(-1)
            entry["data"] = flat.tolist() if array.dtype == object else flat
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
