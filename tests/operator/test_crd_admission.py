"""The ModelDeployment CRD as the real apiserver enforces it, with the offline validator beside."""

from __future__ import annotations

import copy
import json
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modeldeploy_operator.kubeyaml import load_documents
from modeldeploy_operator.validation import (
    default_model_deployment,
    load_crd,
    load_schema,
    validate_model_deployment,
)
from tests.controlplane.harness import ControlPlane
from tests.invalid_manifests import (
    INVALID_MANIFESTS,
    KUBECTL_SCALARS,
    QUANTITY_ORDER,
    VALID_MANIFESTS,
    InvalidManifest,
    Manifest,
    field_changes,
    field_mutations,
    kubectl_scalar_file,
    two_variant_manifest,
    with_cpu,
)

GROUP, VERSION, PLURAL = "modeldeploy.dev", "v1alpha1", "modeldeployments"


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api_client:
        yield api_client


def _create(api: client.ApiClient, namespace: str, manifest: Manifest, **kwargs: Any) -> Any:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest, **kwargs
    )


def _refusal(api: client.ApiClient, namespace: str, manifest: Manifest, **kwargs: Any) -> Any:
    """The apiserver's Status body for a create it must refuse."""
    with pytest.raises(ApiException) as refused:
        _create(api, namespace, manifest, **kwargs)
    return {"code": refused.value.status, **json.loads(refused.value.body or "{}")}


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda case: case.id)
def test_invalid_manifest_is_refused_naming_the_field(
    api: client.ApiClient, namespace: str, case: InvalidManifest
) -> None:
    status = _refusal(api, namespace, case.manifest)

    assert status["code"] == 422, status
    assert status["reason"] == "Invalid"
    causes = sorted((c.get("field"), c["message"]) for c in status["details"]["causes"])
    assert case.field in {field for field, _ in causes}, status
    assert f"{case.field}:" in status["message"]
    # Parity: the offline validator gives exactly the apiserver's errors, word for word.
    assert sorted(validate_model_deployment(case.manifest)) == causes


def _disagreement(api: client.ApiClient, namespace: str, manifest: Manifest) -> Any:
    """None when the apiserver and the offline validator give the same errors, else both."""
    try:
        _create(api, namespace, manifest)
        causes = []
    except ApiException as refused:
        assert refused.status == 422, refused.body
        status = json.loads(refused.body or "{}")
        causes = sorted((c.get("field"), c["message"]) for c in status["details"]["causes"])
    offline = sorted(validate_model_deployment(manifest))
    return None if offline == causes else {"apiserver": causes, "offline": offline}


@pytest.mark.parametrize("name", VALID_MANIFESTS)
def test_offline_validator_agrees_on_every_field_mutation(
    api: client.ApiClient, namespace: str, name: str
) -> None:
    """Hundreds of one-field changes: accepted or refused alike, with the same errors."""
    mutations = list(field_mutations(VALID_MANIFESTS[name]("x")))
    disagreements = {}
    for index, (label, manifest) in enumerate(mutations):
        manifest["metadata"]["name"] = f"{name}-{index}"
        disagreements[label] = _disagreement(api, namespace, manifest)
    assert len(mutations) > 30
    assert {k: v for k, v in disagreements.items() if v is not None} == {}


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_offline_validator_agrees_on_combined_changes(
    api: client.ApiClient, namespace: str, data: st.DataObject
) -> None:
    """Several wrong fields at once: the rules interact (blocking errors, defaults) alike."""
    manifest = VALID_MANIFESTS[data.draw(st.sampled_from(sorted(VALID_MANIFESTS)))]("x")
    changes = data.draw(st.lists(st.sampled_from(field_changes(manifest)), min_size=2, max_size=4))
    for change in changes:
        change.apply(manifest)
    manifest["metadata"]["name"] = f"h-{uuid.uuid4().hex[:12]}"

    assert _disagreement(api, namespace, manifest) is None, [c.label for c in changes]


def test_quantities_compare_alike_offline_and_at_admission(
    api: client.ApiClient, namespace: str
) -> None:
    for index, (request, limit, in_order) in enumerate(QUANTITY_ORDER):
        manifest = with_cpu(request, limit)
        manifest["metadata"]["name"] = f"q{index}"
        offline = validate_model_deployment(manifest)
        if in_order:
            _create(api, namespace, manifest)
            assert offline == []
        else:
            status = _refusal(api, namespace, manifest)
            causes = [(c.get("field"), c["message"]) for c in status["details"]["causes"]]
            message = "Invalid value: must not exceed limits for the same resource"
            assert offline == causes == [("spec.variants[0].resources.requests", message)]


@pytest.mark.parametrize("name", VALID_MANIFESTS)
def test_valid_manifest_is_accepted_with_defaults(
    api: client.ApiClient, namespace: str, name: str
) -> None:
    manifest = VALID_MANIFESTS[name](f"iris-{name}")
    assert validate_model_deployment(manifest) == []

    created = _create(api, namespace, manifest, field_validation="Strict")

    assert created["spec"] == default_model_deployment(manifest)["spec"]


def test_update_that_breaks_a_rule_is_refused_and_changes_nothing(
    api: client.ApiClient, namespace: str
) -> None:
    created = _create(api, namespace, two_variant_manifest())
    variants = created["spec"]["variants"]
    variants[0]["weight"] = 95
    custom = client.CustomObjectsApi(api)

    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "iris", {"spec": {"variants": variants}}
        )

    assert refused.value.status == 422
    assert "spec.variants: Invalid value: the weights" in (refused.value.body or "")
    stored: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "iris")
    assert stored["metadata"]["generation"] == 1
    assert [v["weight"] for v in stored["spec"]["variants"]] == [90, 10]


def test_defaults_fill_routing_and_autoscaling(api: client.ApiClient, namespace: str) -> None:
    manifest = two_variant_manifest()
    manifest["spec"]["variants"][1]["autoscaling"] = {"maxReplicas": 4}

    spec = _create(api, namespace, manifest)["spec"]

    assert spec["routing"] == {"mode": "router", "headerOverride": "x-model-variant"}
    assert spec["variants"][1]["autoscaling"] == {
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetCPUUtilizationPercentage": 80,
    }
    assert "replicas" not in spec["variants"][0]


def test_nulls_are_dropped_before_defaulting(api: client.ApiClient, namespace: str) -> None:
    manifest = two_variant_manifest()
    manifest["spec"]["routing"] = None
    manifest["spec"]["pod"] = {"image": None, "labels": {"team": "ml", "owner": None}}
    assert validate_model_deployment(manifest) == []

    spec = _create(api, namespace, manifest)["spec"]

    assert spec == default_model_deployment(manifest)["spec"]
    assert spec["routing"]["mode"] == "router"
    assert spec["pod"] == {"labels": {"team": "ml"}}


def test_unknown_field_is_refused_by_strict_field_validation(
    api: client.ApiClient, namespace: str
) -> None:
    manifest = two_variant_manifest()
    manifest["spec"]["variants"][1]["wieght"] = 10

    status = _refusal(api, namespace, manifest, field_validation="Strict")

    assert status["code"] == 400, status
    assert 'unknown field "spec.variants[1].wieght"' in status["message"]
    offline = validate_model_deployment(manifest)
    assert ("spec.variants[1].wieght", 'unknown field "spec.variants[1].wieght"') in offline


def test_api_resource_names_match_the_contract(api: client.ApiClient) -> None:
    resources = client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION).resources
    (resource,) = [r for r in resources if r.name == PLURAL]

    assert resource.kind == "ModelDeployment"
    assert resource.singular_name == "modeldeployment"
    assert resource.namespaced is True
    assert resource.short_names == ["mdep"]
    assert resource.categories == ["ml"]
    assert f"{PLURAL}/status" in {r.name for r in resources}


def _status_row(name: str, weight: int) -> dict[str, Any]:
    return {
        "name": name,
        "desiredReplicas": 1,
        "readyReplicas": 1,
        "weight": weight,
        "effectiveWeight": weight,
        "ready": True,
        "modelSha256": "0" * 64,
        "image": "modeldeploy-server:test",
        "service": f"iris-{name}",
    }


def test_status_subresource_keeps_every_field_and_feeds_printer_columns(
    control_plane: ControlPlane, api: client.ApiClient, namespace: str
) -> None:
    _create(api, namespace, two_variant_manifest())
    status = {
        "observedGeneration": 1,
        "url": f"http://iris.{namespace}.svc:8080",
        "readyVariants": "2/2",
        "traffic": "v1=90,v2=10",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllVariantsReady",
                "message": "2 of 2 variants ready",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "variants": [_status_row("v1", 90), _status_row("v2", 10)],
    }
    custom = client.CustomObjectsApi(api)

    written: Any = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "iris", {"status": status}
    )

    assert written["status"] == status
    assert written["metadata"]["generation"] == 1
    table = _get_json(
        control_plane,
        f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}?includeObject=None",
        # What `kubectl get mdep -o wide` renders: the server-side Table of the printer columns.
        accept="application/json;as=Table;g=meta.k8s.io;v=v1",
    )
    columns = [c["name"] for c in table["columnDefinitions"]]
    (row,) = table["rows"]
    cells = dict(zip(columns, row["cells"], strict=True))
    assert cells["Ready"] == "True"
    assert cells["Variants"] == "2/2"
    assert cells["Traffic"] == "v1=90,v2=10"
    assert cells["URL"] == status["url"]


def _get_json(plane: ControlPlane, path: str, accept: str = "application/json") -> Any:
    """A raw GET as the admin, for what the generated client has no method for."""
    context = ssl.create_default_context(cafile=str(plane.pki.ca_cert))
    context.load_cert_chain(str(plane.pki.admin_cert), str(plane.pki.admin_key))
    response = httpx.get(
        plane.server_url + path, headers={"Accept": accept}, verify=context, timeout=30
    )
    response.raise_for_status()
    return response.json()


def test_published_openapi_describes_every_field(control_plane: ControlPlane) -> None:
    """What `kubectl explain modeldeployment --recursive` reads: the apiserver's OpenAPI v3."""
    document = _get_json(control_plane, f"/openapi/v3/apis/{GROUP}/{VERSION}")
    schemas = document["components"]["schemas"]
    published = schemas[f"dev.modeldeploy.{VERSION}.ModelDeployment"]

    for path in ("spec", "spec.variants", "spec.routing.gateway.parentRefs", "status.variants"):
        assert _undescribed(_at(published, path), path) == []
    assert "sum to 100" in _at(published, "spec.variants.weight")["description"]


def _at(schema: Mapping[str, Any], path: str) -> Any:
    for name in path.split("."):
        schema = schema["properties"][name]
        schema = schema.get("items", schema)
    return schema


def _undescribed(schema: Mapping[str, Any], path: str) -> list[str]:
    """Paths under `schema` without a description (metadata is described by its own type)."""
    missing = [] if schema.get("description") or path == "metadata" else [path]
    for name, sub in schema.get("properties", {}).items():
        missing += _undescribed(sub, f"{path}.{name}" if path else name)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            missing += _undescribed(schema[key], f"{path}[]")
    return missing


def test_crd_schema_describes_every_field() -> None:
    assert _undescribed(load_schema(), "") == []


def test_crd_names_and_version_match_the_contract() -> None:
    spec = load_crd()["spec"]

    assert (spec["group"], spec["scope"]) == (GROUP, "Namespaced")
    assert spec["names"]["kind"] == "ModelDeployment"
    assert spec["names"]["plural"] == PLURAL
    assert spec["names"]["shortNames"] == ["mdep"]
    assert spec["names"]["categories"] == ["ml"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:3] == ["Ready", "Variants", "Traffic"] and columns[-1] == "Age"


def _kubectl(plane: ControlPlane, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: install it to check what users see")
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(plane.kubeconfig_path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_kubectl_apply_refuses_every_invalid_manifest_naming_the_field(
    control_plane: ControlPlane, namespace: str
) -> None:
    documents = []
    for index, case in enumerate(INVALID_MANIFESTS):
        manifest = copy.deepcopy(case.manifest)
        if case.field != "metadata.name":
            manifest["metadata"]["name"] = f"case-{index}"
        documents.append(manifest)

    applied = _kubectl(
        control_plane, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(documents)
    )

    assert applied.returncode != 0
    assert "created" not in applied.stdout
    for case, manifest in zip(INVALID_MANIFESTS, documents, strict=True):
        name = manifest["metadata"]["name"]
        (line,) = [line for line in applied.stderr.splitlines() if f'"{name}" is invalid' in line]
        assert f"{case.field}:" in line, (case.id, line)


def test_kubectl_explain_and_get_show_the_api(
    control_plane: ControlPlane, api: client.ApiClient, namespace: str
) -> None:
    # The API server publishes a CRD's OpenAPI schema a moment after it serves the resource
    # (longer for a bigger schema): kubectl explain answers once it is published.
    explained = _kubectl(control_plane, "explain", "mdep.spec.routing.headerOverride")
    deadline = time.monotonic() + 60
    while explained.returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        explained = _kubectl(control_plane, "explain", "mdep.spec.routing.headerOverride")
    assert explained.returncode == 0, explained.stderr
    assert "pin a request to that" in explained.stdout

    _create(api, namespace, two_variant_manifest())
    listed = _kubectl(control_plane, "get", "ml", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[0].split() == [
        "NAME",
        "READY",
        "VARIANTS",
        "TRAFFIC",
        "ROLLOUT",
        "AGE",
    ]
    # The category `ml` holds BatchPredictions too, so kubectl names each row with its kind.
    assert listed.stdout.split("\n")[1].split()[0] == "modeldeployment.modeldeploy.dev/iris"


@pytest.mark.parametrize("case", sorted(KUBECTL_SCALARS))
def test_kubectl_reads_unquoted_scalars_as_validate_does(
    control_plane: ControlPlane, namespace: str, case: str
) -> None:
    """The same file bytes through a real kubectl to the real apiserver and through `validate`."""
    text = kubectl_scalar_file(KUBECTL_SCALARS[case][0])
    ((_, _, obj),) = load_documents(text)
    offline = validate_model_deployment(obj)

    created = _kubectl(
        control_plane, "create", "--dry-run=server", "-n", namespace, "-f", "-", stdin=text
    )

    if not offline:
        assert created.returncode == 0, created.stderr
        assert "created (server dry run)" in created.stdout
    else:
        assert created.returncode != 0
        for error in offline:
            assert f"{error.field}: {error.message}" in created.stderr, created.stderr
