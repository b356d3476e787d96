"""YAML read the way `kubectl apply -f` reads it, so offline checks see what the apiserver sees.

kubectl converts each YAML document to JSON with sigs.k8s.io/yaml, which parses with go-yaml v2
(YAML 1.1 leanings of its own), and the apiserver decodes that JSON. PyYAML's `safe_load` differs:
it keeps `y`/`n`, `1e3` and `0o17` as strings and makes `1:30` an int and `2026-10-02` a date,
where kubectl sends `true`/`false`, 1000, 15 and the strings. This module reproduces go-yaml v2's
scalar resolution (go.yaml.in/yaml/v2 resolve.go), sigs.k8s.io/yaml's key conversion and the
JSON round trip: integers beyond int64 and non-integral floats reach the apiserver as JSON
numbers, integral floats below 1e21 as integers (`1e2` is the integer 100 there), so an unquoted
all-digit sha256 is a number, refused as one.
"""

from __future__ import annotations

import math
import re
import struct
from decimal import Decimal
from typing import Any, NamedTuple, cast

import yaml

_PLAIN = "tag:modeldeploy.dev,2026:plain"
_INT64 = range(-(2**63), 2**63)
_UINT64 = range(2**64)
# go-yaml v2's resolveMap: plain scalars looked up before any number parsing.
_KEYWORDS: dict[str, Any] = {
    **dict.fromkeys(["y", "Y", "yes", "Yes", "YES", "on", "On", "ON"], True),
    **dict.fromkeys(["true", "True", "TRUE"], True),
    **dict.fromkeys(["n", "N", "no", "No", "NO", "off", "Off", "OFF"], False),
    **dict.fromkeys(["false", "False", "FALSE"], False),
    **dict.fromkeys(["", "~", "null", "Null", "NULL"], None),
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
}
_YAML_STYLE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}
_PREFIXES = {"0x": 16, "0X": 16, "0o": 8, "0O": 8, "0b": 2, "0B": 2}


class KubeYAMLError(ValueError):
    """The text is not YAML, or a document cannot become JSON (kubectl refuses it too)."""


class Document(NamedTuple):
    """One non-empty document of a YAML stream, as the apiserver would decode it."""

    number: int  # 1-based position among the non-empty documents
    line: int  # 1-based line where its content starts
    value: Any


def load_documents(text: str) -> list[Document]:
    """Every non-empty document of `text`, each as kubectl would send it to the apiserver."""
    loader = _Loader(text)
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = cast(yaml.Node, loader.get_node())  # check_node: there is one
            value = loader.construct_document(node)
            if value is None:
                continue  # kubectl skips empty documents
            number = len(documents) + 1
            try:
                documents.append(Document(number, node.start_mark.line + 1, _as_json(value)))
            except ValueError as error:
                where = f"document {number} (line {node.start_mark.line + 1})"
                raise KubeYAMLError(f"{where}: cannot convert YAML to JSON: {error}") from None
    except yaml.YAMLError as error:
        raise KubeYAMLError(str(error)) from None
    finally:
        loader.dispose()
    return documents


def resolve_plain(text: str) -> Any:
    """A plain (unquoted) scalar as go-yaml v2 resolves it into an interface{}."""
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    first = text[0]
    if first == ".":
        # strconv.ParseFloat: no underscores without a base prefix; overflow stays a string.
        number = _finite_float(text) if "_" not in text else None
        return text if number is None else number
    if not (first.isdigit() or first in "+-"):
        return text
    # Timestamps stay strings in an interface{}; none of them parses as a number below.
    plain = text.replace("_", "")
    integer = _go_parse_int(plain)
    if integer is not None and (integer in _INT64 or (plain[0] != "+" and integer in _UINT64)):
        return integer
    if _YAML_STYLE_FLOAT.fullmatch(plain):
        number = _finite_float(plain)
        if number is not None:
            return number
    return text


def _finite_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _go_parse_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64)'s digits rules (range checked by the caller)."""
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.removeprefix("+"))
    base = _PREFIXES.get(digits[:2], 8 if len(digits) > 1 and digits[0] == "0" else 10)
    if base != 10:
        digits = digits[2:] if base != 8 or digits[:2] in _PREFIXES else digits[1:]
    if not digits or any(c not in _DIGITS[base] for c in digits):
        return None
    return sign * int(digits, base)


def _as_json(value: Any) -> Any:
    """sigs.k8s.io/yaml's conversion to JSON, then the apiserver's decoding of that JSON."""
    if isinstance(value, dict):
        return {_json_key(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_json(item) for item in value]
    if isinstance(value, bytes):  # !!binary: Go's json.Marshal replaces invalid UTF-8
        return value.decode("utf-8", errors="replace")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        # Beyond int64 the apiserver's JSON decoder falls back to float64.
        return value if value in _INT64 else float(value)
    if not math.isfinite(value):
        raise ValueError(f"json: unsupported value: {_go_float_name(value)}")
    # Go's encoding/json writes integral floats below 1e21 without a fraction or exponent, and
    # the apiserver reads such a number as an int64 where it fits.
    if value.is_integer() and abs(value) < 1e21 and int(value) in _INT64:
        return int(value)
    return value


def _go_float_name(value: float) -> str:
    return "NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf"


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int) and key in _INT64:
        return str(key)
    if isinstance(key, float):
        return _go_float32_key(key)
    raise ValueError(f"unsupported map key: {key!r}")


def _go_float32_key(value: float) -> str:
    """strconv.FormatFloat(value, 'g', -1, 32), with go-yaml's names for the infinities."""
    if not math.isfinite(value):
        return {"NaN": ".nan", "+Inf": ".inf", "-Inf": "-.inf"}[_go_float_name(value)]
    single = _float32(value)
    candidates = (f"{single:.{precision}e}" for precision in range(9))
    digits = next(d for d in candidates if _float32(float(d)) == single)
    mantissa, exponent = digits.split("e")
    # Go's %g on the shortest digits: exponent form below 1e-4 and from 1e6 on.
    if -4 <= int(exponent) < 6:
        return format(Decimal(digits), "f")
    return f"{mantissa}e{int(exponent):+03d}"


def _float32(value: float) -> float:
    rounded: float = struct.unpack("f", struct.pack("f", value))[0]
    return rounded


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with go-yaml v2's resolution of plain and tagged scalars."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and value != "<<":
            return _PLAIN
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]


def _construct_string(loader: _Loader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


def _construct_plain(loader: _Loader, node: yaml.ScalarNode) -> Any:
    return resolve_plain(loader.construct_scalar(node))


def _construct_tagged(kinds: tuple[type, ...]) -> Any:
    """An explicit !!int, !!float, !!bool or !!null: resolved as plain, then type-checked."""

    def construct(loader: _Loader, node: yaml.ScalarNode) -> Any:
        value = resolve_plain(loader.construct_scalar(node))
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot decode {node.value!r} as {node.tag}", node.start_mark
            )
        return value

    return construct


_Loader.add_constructor(_PLAIN, _construct_plain)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_tagged((int,)))
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_tagged((float,)))
_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_tagged((bool,)))
_Loader.add_constructor("tag:yaml.org,2002:null", _construct_tagged((type(None),)))
# An explicit !!timestamp stays the string it is in an interface{}.
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_string)
