"""Behaviour only a real API server has: schema and CEL validation, server-side apply, garbage
collection, RBAC, Pod Security warnings, and the controller-manager's namespace/role controllers."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.controlplane import harness

pytestmark = pytest.mark.controlplane

GROUP = "cptest.modeldeploy.dev"
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "min": {"type": "integer"},
                                    "max": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min > max"}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def poll(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """True as soon as `condition` holds; False if it never did within the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def is_gone(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


@pytest.fixture
def api(control_plane: harness.ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def widget_crd(control_plane: harness.ControlPlane) -> Iterator[None]:
    with control_plane.api_client() as api:
        harness.install_crds(api, [WIDGET_CRD])
        yield
        client.ApiextensionsV1Api(api).delete_custom_resource_definition(
            WIDGET_CRD["metadata"]["name"]
        )


def widget(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": spec,
    }


@pytest.mark.usefixtures("widget_crd")
def test_valid_custom_resource_is_accepted(api: client.ApiClient, namespace: str) -> None:
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, "v1", namespace, "widgets", widget({"size": 2, "min": 1, "max": 3})
    )
    assert isinstance(created, dict)
    assert created["spec"] == {"size": 2, "min": 1, "max": 3}


@pytest.mark.usefixtures("widget_crd")
@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        ({"size": "big", "min": 1, "max": 2}, ("spec.size", "FieldValueTypeInvalid", "integer")),
        ({"size": 0, "min": 1, "max": 2}, ("spec.size", "FieldValueInvalid", "greater than")),
        ({"min": 1, "max": 2}, ("spec.size", "FieldValueRequired", "Required")),
        ({"size": 1, "min": 5, "max": 2}, ("spec", "FieldValueInvalid", "min > max")),  # CEL
    ],
    ids=["wrong-type", "below-minimum", "missing-required", "cel-rule"],
)
def test_invalid_custom_resource_is_rejected_with_422(
    api: client.ApiClient, namespace: str, spec: dict[str, Any], cause: tuple[str, str, str]
) -> None:
    with pytest.raises(ApiException) as error:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, "v1", namespace, "widgets", widget(spec)
        )
    assert error.value.status == 422
    status = json.loads(error.value.body or "{}")
    causes = [(c["field"], c["reason"], c["message"]) for c in status["details"]["causes"]]
    field, reason, fragment = cause
    assert any((f, r) == (field, reason) and fragment in message for f, r, message in causes), (
        causes
    )


def apply_config_map(
    api: client.ApiClient, namespace: str, data: dict[str, str], manager: str, force: bool = False
) -> client.V1ConfigMap:
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": data}
    return client.CoreV1Api(api).patch_namespaced_config_map(
        "cm",
        namespace,
        body,
        field_manager=manager,
        force=force,
        _content_type="application/apply-patch+yaml",
    )


def test_server_side_apply_merges_managers_and_reports_conflicts(
    api: client.ApiClient, namespace: str
) -> None:
    apply_config_map(api, namespace, {"a": "1"}, "alpha")
    merged = apply_config_map(api, namespace, {"b": "2"}, "beta")
    assert merged.data == {"a": "1", "b": "2"}
    assert merged.metadata is not None
    managers = {entry.manager for entry in merged.metadata.managed_fields or []}
    assert {"alpha", "beta"} <= managers

    with pytest.raises(ApiException) as conflict:
        apply_config_map(api, namespace, {"a": "changed", "b": "2"}, "beta")
    assert conflict.value.status == 409
    assert "alpha" in str(conflict.value.body)

    forced = apply_config_map(api, namespace, {"a": "changed", "b": "2"}, "beta", force=True)
    assert forced.data == {"a": "changed", "b": "2"}
    # alpha lost `a` to the forced apply, so an apply by alpha that omits it removes nothing.
    after = apply_config_map(api, namespace, {}, "alpha")
    assert after.data == {"a": "changed", "b": "2"}


def test_deleting_owner_garbage_collects_children(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    assert owner.metadata is not None and owner.metadata.uid
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="child", owner_references=[reference])),
    )
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="unowned"))
    )

    core.delete_namespaced_config_map("owner", namespace)

    assert poll(lambda: is_gone(lambda: core.read_namespaced_secret("child", namespace)))
    core.read_namespaced_secret("unowned", namespace)  # the collector only takes dependents


def test_service_account_without_permission_is_forbidden(
    control_plane: harness.ControlPlane, api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="robot"))
    )
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="read-config-maps"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="robot-reads-config-maps"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="read-config-maps"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="robot", namespace=namespace)
            ],
        ),
    )

    kubeconfig = control_plane.service_account_kubeconfig(namespace, "robot")
    with harness.api_client_from_kubeconfig(kubeconfig) as robot_api:
        robot = client.CoreV1Api(robot_api)
        robot.list_namespaced_config_map(namespace)  # granted: the token authenticates
        with pytest.raises(ApiException) as denied:
            robot.list_namespaced_secret(namespace)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:robot" in str(denied.value.body)
        with pytest.raises(ApiException) as elsewhere:
            robot.list_namespaced_config_map("default")  # a Role grants only its namespace
        assert elsewhere.value.status == 403


def test_aggregated_cluster_role_grants_access(
    control_plane: harness.ControlPlane, api: client.ApiClient, namespace: str
) -> None:
    # The built-in `view` role is empty until the controller-manager aggregates its rules in.
    client.CoreV1Api(api).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="viewer"))
    )
    client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="viewer-views"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="view"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="viewer", namespace=namespace)
            ],
        ),
    )
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "viewer")
    with harness.api_client_from_kubeconfig(kubeconfig) as viewer_api:
        viewer = client.AppsV1Api(viewer_api)
        viewer.list_namespaced_deployment(namespace)
        with pytest.raises(ApiException) as denied:
            viewer.delete_namespaced_deployment("anything", namespace)
        assert denied.value.status == 403


# RFC 7234 warn-value: `299 - "text"`, several joined by ", " when the header repeats.
WARN_VALUE = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')


def warnings_of(headers: Mapping[str, str]) -> list[str]:
    """The texts of the apiserver's `Warning` response headers."""
    texts = WARN_VALUE.findall(headers.get("Warning", ""))
    return [re.sub(r"\\(.)", r"\1", text) for text in texts]


def privileged_deployment() -> client.V1Deployment:
    labels = {"app": "web"}
    container = client.V1Container(
        name="web",
        image="registry.invalid/web:1",
        security_context=client.V1SecurityContext(privileged=True),
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1DeploymentSpec(
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[container]),
            ),
        ),
    )


def test_restricted_pod_security_violation_produces_warning(
    api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/warn": "restricted"}}}
    )
    _, status, headers = client.AppsV1Api(api).create_namespaced_deployment_with_http_info(
        namespace, privileged_deployment()
    )
    assert status == 201
    [warning] = warnings_of(headers)
    assert warning.startswith('would violate PodSecurity "restricted:latest": privileged')
    assert 'container "web" must not set securityContext.privileged=true' in warning


def test_pod_security_is_silent_without_the_label(api: client.ApiClient, namespace: str) -> None:
    _, status, headers = client.AppsV1Api(api).create_namespaced_deployment_with_http_info(
        namespace, privileged_deployment()
    )
    assert status == 201
    assert warnings_of(headers) == []


def test_deleted_namespace_is_finalized(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    name = "cp-finalize-me"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(
        name, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="content"))
    )
    core.delete_namespace(name)
    # Without the namespace controller it would stay Terminating forever.
    assert poll(lambda: is_gone(lambda: core.read_namespace(name)))


def test_stop_leaves_no_processes_or_files(control_plane_binaries: harness.Binaries) -> None:
    with harness.running(control_plane_binaries, []) as plane:
        pids = [process.popen.pid for process in plane.processes]
        assert len(pids) == 3
        for pid in pids:
            os.kill(pid, 0)  # running
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not plane.workdir.exists()
