"""The offline validator refuses what admission refuses, naming the same fields (pure tests)."""

from __future__ import annotations

import copy
import json

import pytest

from modeldeploy_operator.validation import (
    FieldError,
    default_model_deployment,
    load_schema,
    validate_model_deployment,
)
from tests.invalid_manifests import (
    INVALID_MANIFESTS,
    QUANTITY_ORDER,
    VALID_MANIFESTS,
    InvalidManifest,
    field_mutations,
    minimal_manifest,
    two_variant_manifest,
    with_cpu,
)


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda case: case.id)
def test_invalid_manifest_names_the_field(case: InvalidManifest) -> None:
    errors = validate_model_deployment(case.manifest)

    assert case.field in {e.field for e in errors}, errors
    assert all(e.message for e in errors)


def test_invalid_cases_are_many_and_distinct() -> None:
    assert len({case.id for case in INVALID_MANIFESTS}) == len(INVALID_MANIFESTS) >= 15
    assert len({case.field for case in INVALID_MANIFESTS}) >= 15


@pytest.mark.parametrize("name", VALID_MANIFESTS)
def test_valid_manifest_passes(name: str) -> None:
    assert validate_model_deployment(VALID_MANIFESTS[name]("iris")) == []


def test_every_cel_rule_is_broken_by_some_invalid_case() -> None:
    """No rule in the CRD goes untested: each one fails for at least one invalid manifest."""
    broken = {
        (_strip_indices(e.field), e.message)
        for case in INVALID_MANIFESTS
        for e in validate_model_deployment(case.manifest)
    }
    untested = [
        (path, message)
        for path, message in _rules(load_schema(), "")
        if not any(field == path and text.endswith(message) for field, text in broken)
    ]
    assert untested == []


def _rules(schema: dict[str, object], path: str) -> list[tuple[str, str]]:
    """(field path without indices, message) of every CEL rule in `schema`."""
    found = []
    rules = schema.get("x-kubernetes-validations")
    if isinstance(rules, list):
        for rule in rules:
            found.append(((path + rule.get("fieldPath", "")).lstrip("."), rule["message"]))
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name, sub in properties.items():
            found += _rules(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        if isinstance(sub, dict):
            found += _rules(sub, path)
    return found


def _strip_indices(field: str) -> str:
    return field.split("[", 1)[0] + "".join(part.split("]", 1)[1] for part in field.split("[")[1:])


def test_wrong_api_version_and_kind_are_named() -> None:
    manifest = minimal_manifest()
    manifest.update(apiVersion="modeldeploy.dev/v1", kind="Deployment")

    fields = [e.field for e in validate_model_deployment(manifest)]

    assert fields == ["apiVersion", "kind"]


def test_missing_name_is_required() -> None:
    manifest = minimal_manifest()
    del manifest["metadata"]["name"]

    errors = validate_model_deployment(manifest)

    assert FieldError("metadata.name", "Required value: name is required") in errors


def test_uppercase_name_fails_the_generic_and_the_crd_name_checks() -> None:
    errors = validate_model_deployment(minimal_manifest("Iris"))

    assert [e.field for e in errors] == ["metadata.name", "metadata.name"]
    assert "RFC 1123 subdomain" in errors[0].message
    assert "should match '^[a-z]" in errors[1].message


def test_type_error_stops_before_the_rules_as_the_apiserver_does() -> None:
    manifest = two_variant_manifest()
    manifest["spec"]["variants"][0]["weight"] = "90"
    manifest["spec"]["variants"][1]["weight"] = 50

    errors = validate_model_deployment(manifest)

    assert [e.field for e in errors] == ["spec.variants[0].weight", "<nil>"]


def test_unknown_field_is_named_like_strict_field_validation() -> None:
    manifest = minimal_manifest()
    manifest["spec"]["routing"] = {"mode": "router", "weights": {"v1": 100}}

    errors = validate_model_deployment(manifest)

    assert errors == [FieldError("spec.routing.weights", 'unknown field "spec.routing.weights"')]


def test_messages_say_what_is_wrong() -> None:
    manifest = two_variant_manifest()
    manifest["spec"]["variants"][1]["weight"] = 30

    (error,) = validate_model_deployment(manifest)

    assert error == FieldError(
        "spec.variants", "Invalid value: the weights of all variants must sum to 100"
    )


def test_regex_dialect_is_the_apiservers() -> None:
    # Python's `$` also matches before a final newline; RE2 (the apiserver's) does not.
    manifest = minimal_manifest()
    manifest["spec"]["variants"][0]["name"] = "v1\n"

    fields = [e.field for e in validate_model_deployment(manifest)]

    assert "spec.variants[0].name" in fields


def test_not_a_mapping_is_refused() -> None:
    assert validate_model_deployment(["not", "an", "object"])[0].field == "<root>"


def test_defaults_fill_nested_objects_without_touching_the_input() -> None:
    manifest = two_variant_manifest()
    manifest["spec"]["routing"] = {"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw"}]}}

    defaulted = default_model_deployment(manifest)

    assert defaulted["spec"]["routing"] == {
        "mode": "gateway",
        "headerOverride": "x-model-variant",
        "gateway": {
            "parentRefs": [{"name": "gw", "group": "gateway.networking.k8s.io", "kind": "Gateway"}],
            "pathPrefix": "/",
        },
    }
    assert "headerOverride" not in manifest["spec"]["routing"]


@pytest.mark.parametrize("name", VALID_MANIFESTS)
def test_every_field_mutation_gets_an_answer(name: str) -> None:
    """Whatever one field holds, the validator answers with errors; it never raises."""
    for label, manifest in field_mutations(VALID_MANIFESTS[name]("iris")):
        errors = validate_model_deployment(manifest)
        assert all(isinstance(e, FieldError) and e.field and e.message for e in errors), label


@pytest.mark.parametrize(("request_", "limit", "in_order"), QUANTITY_ORDER)
def test_requests_are_compared_with_limits_as_quantities(
    request_: str | int, limit: str | int, in_order: bool
) -> None:
    errors = validate_model_deployment(with_cpu(request_, limit))

    expected = (
        []
        if in_order
        else [
            FieldError(
                "spec.variants[0].resources.requests",
                "Invalid value: must not exceed limits for the same resource",
            )
        ]
    )
    assert errors == expected


SCHEMES = "must start with https://, http://, file:// or pvc://"
FORMS = "must be https://host/path, http://host/path, file:///absolute/path or pvc://claim/path"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/iris.onnx", f"unsupported scheme: the model URI {SCHEMES}"),
        ("HTTPS://models.example.com/iris.onnx", f"unsupported scheme: the model URI {SCHEMES}"),
        ("file://iris.onnx", FORMS),
        ("pvc://Models/iris.onnx", FORMS),
        ("https://models.example.com/my model.onnx", FORMS),
    ],
)
def test_uri_errors_name_the_allowed_schemes_not_a_regex(uri: str, expected: str) -> None:
    manifest = minimal_manifest()
    manifest["spec"]["variants"][0]["model"]["uri"] = uri

    (error,) = validate_model_deployment(manifest)

    assert error.field == "spec.variants[0].model.uri"
    assert error.message.startswith(f"Invalid value: {json.dumps(uri)}: {expected}")
    assert "should match" not in error.message


@pytest.mark.parametrize(
    "case_id",
    [
        "pod-label-value-too-long",
        "pod-annotation-value-too-long",
        "node-selector-value-too-long",
        "gateway-too-many-parent-refs",
        "gateway-parent-ref-name-too-long",
        "gateway-hostname-too-long",
        "pod-image-too-long",
        "pod-too-many-pull-secrets",
        "toleration-key-too-long",
    ],
)
def test_length_limits_that_bound_no_rule_leave_the_rules_checked(case_id: str) -> None:
    """A CEL rule, not maxLength: the apiserver skips every rule after a TooLong error and says
    `<nil>: ... some validation rules were not checked`; here the weights rule still answers."""
    (case,) = [c for c in INVALID_MANIFESTS if c.id == case_id]
    manifest = copy.deepcopy(case.manifest)
    manifest["spec"]["variants"][1]["weight"] = 20

    errors = validate_model_deployment(manifest)

    assert sorted(e.field for e in errors) == sorted([case.field, "spec.variants"])
    (length,) = [e.message for e in errors if e.field == case.field]
    assert length.endswith(("characters", ": must have at most 16 items", "at most 8 items"))
