"""The informer's list on the real API server: every page, each object as the index keeps it."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from modeldeploy_operator import kube, naming
from modeldeploy_operator.informer import trim
from modeldeploy_operator.kube import KubeApi
from tests.controlplane.harness import ControlPlane

pytestmark = pytest.mark.controlplane


def test_a_list_reads_every_page_and_hands_back_only_trimmed_objects(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pages of 2 (500 in production): five objects take three pages, as thousands take many.
    monkeypatch.setattr(kube, "_LIST_PAGE", 2)
    selector = f"{naming.MANAGED_BY}={naming.FIELD_MANAGER}"
    labels = {naming.MANAGED_BY: naming.FIELD_MANAGER}
    names = [f"cm-{i}" for i in range(5)]
    seen: list[dict[str, Any]] = []

    def keep(obj: dict[str, Any]) -> dict[str, Any]:
        seen.append(obj)
        return trim(obj, "ConfigMap")

    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        for name in [*names, "not-ours"]:
            meta = client.V1ObjectMeta(name=name, labels=labels if name != "not-ours" else None)
            core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=meta))
        objects, version = KubeApi(api).list_objects(
            "v1", "configmaps", "ConfigMap", namespace, selector, keep
        )
    assert sorted(o["metadata"]["name"] for o in objects) == names
    assert [o["metadata"]["name"] for o in seen] == [o["metadata"]["name"] for o in objects]
    # What the server sent had managedFields; what the informer holds has not.
    assert all("managedFields" in o["metadata"] for o in seen)
    assert not any("managedFields" in o["metadata"] for o in objects)
    assert all(o["kind"] == "ConfigMap" for o in objects)
    assert int(version) > 0
