"""Compare a shadow variant's answer with the primary's, output by output (pure).

Open Inference Protocol v2 answers (`{"outputs": [{"name", "datatype", "shape", "data"}]}`) are
compared per output: integers, booleans and strings (labels) must be equal; floats agree when
every row's argmax is the same (rows: the last dimension holds the scores) and no value differs by
more than the tolerance. Any other JSON answer (v1 `predictions`, records) must be equal as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

_FLOATS = frozenset({"FP16", "FP32", "FP64", "BF16"})


@dataclass(frozen=True)
class Comparison:
    """Whether two answers agree; the largest float difference seen (None if no floats)."""

    agree: bool
    max_abs_difference: float | None
    detail: str  # why they disagree; "" when they agree


def compare_answers(primary: bytes, shadow: bytes, tolerance: float) -> Comparison:
    """Compare two answer bodies to the same request."""
    try:
        first, second = orjson.loads(primary), orjson.loads(shadow)
    except orjson.JSONDecodeError:
        same = primary == shadow
        return Comparison(same, None, "" if same else "answers differ (not JSON)")
    if not (_is_v2(first) and _is_v2(second)):
        same = first == second
        return Comparison(same, None, "" if same else "answers differ")
    shadow_outputs = {o.get("name"): o for o in second["outputs"]}
    largest: float | None = None
    problems = []
    for output in first["outputs"]:
        name = output.get("name")
        other = shadow_outputs.get(name)
        if other is None:
            problems.append(f"{name}: missing from the shadow answer")
            continue
        problem, difference = _compare_output(output, other, tolerance)
        if difference is not None:
            largest = difference if largest is None else max(largest, difference)
        if problem:
            problems.append(f"{name}: {problem}")
    return Comparison(not problems, largest, "; ".join(problems))


def _is_v2(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and isinstance(document.get("outputs"), list)
        and all(isinstance(o, dict) for o in document["outputs"])
    )


def _compare_output(
    first: dict[str, Any], second: dict[str, Any], tolerance: float
) -> tuple[str, float | None]:
    if first.get("shape") != second.get("shape"):
        return f"shape {first.get('shape')} vs {second.get('shape')}", None
    a, b = first.get("data"), second.get("data")
    if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
        return "data of different lengths", None
    if first.get("datatype") not in _FLOATS or second.get("datatype") not in _FLOATS:
        return ("" if a == b else "values differ"), None
    try:
        difference = max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    except TypeError:
        return "values are not numbers", None
    shape = first.get("shape") or [len(a)]
    width = shape[-1] if isinstance(shape[-1], int) and shape[-1] > 1 else 0
    if width and _argmaxes(a, width) != _argmaxes(b, width):
        return "argmax differs", difference
    if difference > tolerance:
        return f"values differ by {difference:g} > {tolerance:g}", difference
    return "", difference


def _argmaxes(values: list[float], width: int) -> list[int]:
    return [
        max(range(width), key=values[start : start + width].__getitem__)
        for start in range(0, len(values), width)
    ]
