"""Offline validation of a ModelDeployment or BatchPrediction against its CRD's own schema and
CEL rules.

The apiserver is the authority; this module reproduces what it checks at admission from the very
same file (crds/), so `modeldeploy validate` and `kubectl apply` refuse the same manifests and name
the same fields: structural defaulting, the OpenAPI schema, list-map key uniqueness, then the
`x-kubernetes-validations` rules evaluated with cel-python. Transition rules (those that read
`oldSelf`) apply to updates only, so, as for a create, they are not evaluated.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from importlib.resources import files
from typing import Any, NamedTuple

import celpy
import jsonschema
import re2  # type: ignore[import-untyped]  # google-re2: the regex dialect of the apiserver
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from modeldeploy_operator.spec import BATCH_KIND, KIND, MODEL_DEPLOYMENT_API_VERSION

CRD_FILES = {
    KIND: "modeldeployments.modeldeploy.dev.yaml",
    BATCH_KIND: "batchpredictions.modeldeploy.dev.yaml",
}

Schema = Mapping[str, Any]


class _MapKey(str):
    """A path step into a map (additionalProperties): rules name it `labels[team]`."""


PathPart = str | int

# metadata.name of any custom resource must be a DNS-1123 subdomain (checked by the apiserver
# before the CRD's own rules, which narrow it further).
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TRANSITION = re.compile(r"\boldSelf\b")
_FIELD_PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
# The apiserver skips the CEL rules after errors of these kinds (its hasBlockingErr: TypeInvalid,
# Required, NotSupported, TooLong, TooMany), and says so in these words.
_BLOCKING = frozenset({"type", "required", "enum", "maxLength", "maxItems", "maxProperties"})
_STRING_CHECKS = ("maxLength", "minLength", "pattern")
_RULES_NOT_CHECKED = (
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation"
)


class FieldError(NamedTuple):
    """One validation error: the field path as the apiserver writes it, and what is wrong."""

    field: str
    message: str


@functools.cache
def load_crd(kind: str = KIND) -> dict[str, Any]:
    """The CustomResourceDefinition of `kind` shipped in the modeldeploy_crds package."""
    text = files("modeldeploy_crds").joinpath(CRD_FILES[kind]).read_text(encoding="utf-8")
    crd: dict[str, Any] = yaml.safe_load(text)
    return crd


def load_schema(kind: str = KIND) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD's storage version."""
    (version,) = [v for v in load_crd(kind)["spec"]["versions"] if v["storage"]]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def default_model_deployment(obj: Mapping[str, Any], kind: str = KIND) -> dict[str, Any]:
    """A copy of `obj` with the CRD's defaults filled in, as the apiserver stores it."""
    defaulted = copy.deepcopy(dict(obj))
    _apply_defaults(load_schema(kind), defaulted)
    return defaulted


def validate_model_deployment(obj: object, kind: str = KIND) -> list[FieldError]:
    """Every reason the apiserver would refuse `obj` as a ModelDeployment (or another `kind` of
    ours) at creation (empty when valid)."""
    if not isinstance(obj, Mapping):
        return [FieldError("<root>", f"must be a mapping (a {kind} object)")]
    name_errors = list(_check_name(obj.get("metadata")))
    errors = [*_check_type_meta(obj, kind), *name_errors]
    schema = load_schema(kind)
    defaulted = default_model_deployment(obj, kind)
    schema_errors = _first_string_failures(
        sorted(
            _validator(kind).iter_errors(defaulted), key=lambda e: [str(p) for p in e.absolute_path]
        )
    )
    # One `required` error per missing field, each listing them all: keep each field once.
    errors += dict.fromkeys(error for e in schema_errors for error in _describe(e))
    errors += _duplicate_keys(schema, defaulted, [])
    name_missing = any(e.message.startswith("Required") for e in name_errors)
    if name_missing or any(e.validator in _BLOCKING for e in schema_errors):
        errors.append(FieldError("<nil>", f"Invalid value: null: {_RULES_NOT_CHECKED}"))
    else:
        errors += _rule_errors(schema, _cel_view(defaulted), [])
    return errors


def _check_type_meta(obj: Mapping[str, Any], kind: str) -> Iterator[FieldError]:
    for field, expected in (("apiVersion", MODEL_DEPLOYMENT_API_VERSION), ("kind", kind)):
        if obj.get(field) != expected:
            yield FieldError(field, f'Unsupported value: {_show(obj.get(field))}: "{expected}"')


def _check_name(metadata: object) -> Iterator[FieldError]:
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        yield FieldError("metadata.name", "Required value: name is required")
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        yield FieldError(
            "metadata.name",
            f"Invalid value: {_show(name)}: a lowercase RFC 1123 subdomain must consist of lower"
            " case alphanumeric characters, '-' or '.', and must start and end with an"
            " alphanumeric character (e.g. 'example.com', regex used for validation is"
            f" '{_DNS1123_SUBDOMAIN.pattern}')",
        )


def _apply_defaults(schema: Schema, value: Any) -> None:
    """Fill defaults top-down, then default inside what was filled in (structural defaulting)."""
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            # The apiserver drops nulls of non-nullable fields before defaulting.
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name in value.keys() - schema.get("properties", {}).keys():
                if value[name] is None and not extra.get("nullable"):
                    del value[name]
                else:
                    _apply_defaults(extra, value[name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _apply_defaults(schema["items"], item)


def _to_json_schema(schema: Schema, *, closed: bool = True) -> dict[str, Any]:
    """Translate the structural-schema dialect into plain JSON Schema (draft 7)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("nullable"):
        out["type"] = [*_as_list(out.get("type", [])), "null"]
    if "properties" in schema:
        out["properties"] = {k: _to_json_schema(v) for k, v in schema["properties"].items()}
        # Unknown fields are what `kubectl apply` (strict field validation) refuses.
        if (
            closed
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), Mapping):
        out["additionalProperties"] = _to_json_schema(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = _to_json_schema(schema["items"])
    return out


def _as_list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _re2_pattern(
    validator: jsonschema.protocols.Validator, pattern: str, instance: object, schema: Schema
) -> Iterator[jsonschema.ValidationError]:
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft7Validator, {"pattern": _re2_pattern}
)


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _to_json_schema(load_schema(kind))
    # ObjectMeta is the apiserver's own type; the CRD may only narrow its name.
    schema["properties"]["metadata"] = _to_json_schema(
        load_schema(kind)["properties"]["metadata"], closed=False
    )
    validator: jsonschema.protocols.Validator = _Validator(schema)
    return validator


def _first_string_failures(
    errors: list[jsonschema.ValidationError],
) -> list[jsonschema.ValidationError]:
    """Keep one string error per field: the apiserver checks these in turn, stopping at one."""
    failed = {(tuple(e.absolute_path), e.validator) for e in errors}

    def shadowed(error: jsonschema.ValidationError) -> bool:
        if error.validator not in _STRING_CHECKS:
            return False
        earlier = _STRING_CHECKS[: _STRING_CHECKS.index(str(error.validator))]
        return any((tuple(error.absolute_path), check) in failed for check in earlier)

    return [e for e in errors if not shadowed(e)]


def _describe(error: jsonschema.ValidationError) -> Iterator[FieldError]:
    """Phrase a JSON Schema error in the apiserver's words for the same violation."""
    path = list(error.absolute_path)
    value: Any = error.instance
    limit: Any = error.validator_value
    declared: Any = error.schema
    if error.validator == "required":
        for name in limit:
            if name not in value:
                yield FieldError(_format_path([*path, name]), "Required value")
        return
    if error.validator == "additionalProperties":
        for name in sorted(value.keys() - declared.get("properties", {}).keys()):
            # kubectl's words: it asks for strict field validation, which refuses unknown fields.
            field = _format_path([*path, name])
            yield FieldError(field, f'unknown field "{field}"')
        return
    field = _format_path(path)
    phrase = _PHRASES.get(str(error.validator))
    message = phrase(value, limit, field) if phrase else f"Invalid value: {error.message}"
    yield FieldError(field, message)


_PHRASES: dict[str, Callable[[Any, Any, str], str]] = {
    "type": lambda v, lim, f: (
        f"Invalid value: {_show(_json_type(v))}: {f} in body must be of type"
        f" {','.join(_as_list(lim))}: {_show(_json_type(v))}"
    ),
    "enum": lambda v, lim, f: (
        f"Unsupported value: {_show(v)}: supported values: {', '.join(map(_show, lim))}"
    ),
    "pattern": lambda v, lim, f: f"Invalid value: {_show(v)}: {f} in body should match '{lim}'",
    "minimum": lambda v, lim, f: (
        f"Invalid value: {v}: {f} in body should be greater than or equal to {lim}"
    ),
    "maximum": lambda v, lim, f: (
        f"Invalid value: {v}: {f} in body should be less than or equal to {lim}"
    ),
    "minLength": lambda v, lim, f: (
        f"Invalid value: {_show(v)}: {f} in body should be at least {lim} chars long"
    ),
    "maxLength": lambda v, lim, f: f"Too long: may not be more than {lim} bytes",
    "minItems": lambda v, lim, f: (
        f"Invalid value: {len(v)}: {f} in body should have at least {lim} items"
    ),
    "maxItems": lambda v, lim, f: f"Too many: {len(v)}: must have at most {lim} items",
    "maxProperties": lambda v, lim, f: f"Too many: {len(v)}: must have at most {lim} items",
}


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def _show(value: object) -> str:
    """A value as the apiserver prints it in a message (JSON, compact)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _format_path(parts: Sequence[PathPart]) -> str:
    """Render a path like the apiserver: `spec.variants[1].weight`, map keys as fields too."""
    return "".join(
        f"[{part}]" if isinstance(part, int | _MapKey) else f".{part}" if index else part
        for index, part in enumerate(parts)
    )


def _children(schema: Schema, value: Any) -> Iterator[tuple[Schema, Any, PathPart]]:
    """The present children of `value` with their schemas and path steps."""
    if isinstance(value, Mapping):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            if key in properties:
                yield properties[key], child, key
            elif isinstance(extra, Mapping):
                yield extra, child, _MapKey(key)
    elif isinstance(value, list) and "items" in schema:
        for index, child in enumerate(value):
            yield schema["items"], child, index


def _duplicate_keys(schema: Schema, value: Any, path: list[PathPart]) -> list[FieldError]:
    """Items of an `x-kubernetes-list-type: map` list are objects (or null) with distinct keys.

    As the apiserver does: the first non-object ends the check of that list; each repeated key
    is reported once, at its first repetition; a null item or a missing key field is `{}`.
    """
    errors: list[FieldError] = []
    if schema.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
        errors += _list_map_errors(schema["x-kubernetes-list-map-keys"], value, path)
    for sub, child, step in _children(schema, value):
        errors += _duplicate_keys(sub, child, [*path, step])
    return errors


def _list_map_errors(keys: list[str], items: list[Any], path: list[PathPart]) -> list[FieldError]:
    for index, item in enumerate(items):
        if item is not None and not isinstance(item, Mapping):
            message = (
                f"Invalid value: {_show(item)}: must be an object for an array of list-type map"
            )
            return [FieldError(_format_path([*path, index]), message)]
    counts: dict[str, int] = {}
    errors: list[FieldError] = []
    for index, item in enumerate(items):
        key = _show({k: item[k] for k in keys if k in item} if item is not None else {})
        counts[key] = counts.get(key, 0) + 1
        if counts[key] == 2:
            errors.append(FieldError(_format_path([*path, index]), f"Duplicate value: {key}"))
    return errors


def _cel_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The root as CEL rules see it: of metadata, only name and generateName."""
    metadata = obj.get("metadata")
    meta = metadata if isinstance(metadata, Mapping) else {}
    return {
        **obj,
        "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta},
    }


def _rule_errors(schema: Schema, value: Any, path: list[PathPart]) -> list[FieldError]:
    """Evaluate every `x-kubernetes-validations` rule on every value present, top-down."""
    errors: list[FieldError] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if _TRANSITION.search(rule["rule"]):
            continue
        failure = _evaluate_rule(rule, value)
        if failure is not None:
            steps = _FIELD_PATH_STEP.findall(rule.get("fieldPath", ""))
            errors.append(FieldError(_format_path([*path, *steps]), failure))
    for sub, child, step in _children(schema, value):
        errors += _rule_errors(sub, child, [*path, step])
    return errors


def _evaluate_rule(rule: Mapping[str, str], value: Any) -> str | None:
    """None when the rule holds, else the message the apiserver would give."""
    try:
        result = _program(rule["rule"]).evaluate({"self": json_to_cel(value)})
    except CELEvalError as exc:
        return f"Invalid value: {_show(_json_type(value))}: evaluation error: {exc.args[0]}"
    if isinstance(result, celtypes.BoolType) and bool(result):
        return None
    message = rule.get("message") or f"failed rule: {rule['rule']}"
    reason = rule.get("reason", "FieldValueInvalid")
    if reason == "FieldValueForbidden":
        return f"Forbidden: {message}"
    if reason == "FieldValueRequired":
        return f"Required value: {message}"
    # The value is shown only when the field named is the rule's own scalar.
    scalar = "fieldPath" not in rule and isinstance(value, str | int | float | bool)
    return f"Invalid value: {_show(value)}: {message}" if scalar else f"Invalid value: {message}"


def _cel_sum(values: celtypes.ListType) -> Any:
    total: Any = celtypes.IntType(0)
    for value in values:
        total = total + value
    return total


def _cel_is_sorted(values: celtypes.ListType) -> celtypes.BoolType:
    items: list[Any] = list(values)
    return celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(items)))


_QUANTITY = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?"
)
_QUANTITY_SUFFIXES = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{
        s: Decimal(10) ** e
        for s, e in zip("numkMGTPE", (-9, -6, -3, 3, 6, 9, 12, 15, 18), strict=True)
    },
}


def _parse_quantity(text: str) -> Decimal | None:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        return None
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE" and len(suffix) > 1:
        return Decimal(number) * Decimal(10) ** int(suffix[1:])
    return Decimal(number) * _QUANTITY_SUFFIXES.get(suffix or "", Decimal(1))


def _cel_is_quantity(text: celtypes.StringType) -> celtypes.BoolType:
    return celtypes.BoolType(_parse_quantity(str(text)) is not None)


def _cel_quantity(text: celtypes.StringType) -> Decimal | CELEvalError:
    quantity = _parse_quantity(str(text))
    # Returned, not raised: an error value lets `||` and `&&` absorb it, as CEL requires.
    return quantity if quantity is not None else CELEvalError(f"invalid quantity {text!r}")


def _cel_compare_to(left: Decimal, right: Decimal) -> celtypes.IntType:
    return celtypes.IntType((left > right) - (left < right))


# The apiserver's CEL has the Kubernetes libraries; cel-python lacks the parts the CRD uses:
# sum() and isSorted() of the list library, and quantity(), isQuantity() and compareTo() of the
# quantity library.
_KUBERNETES_FUNCTIONS: dict[str, Any] = {
    "sum": _cel_sum,
    "isSorted": _cel_is_sorted,
    "isQuantity": _cel_is_quantity,
    "quantity": _cel_quantity,
    "compareTo": _cel_compare_to,
}


@functools.cache
def _program(expression: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression), _KUBERNETES_FUNCTIONS)
