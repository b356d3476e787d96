"""The `cluster` fixture: the operator running against the real control plane, and an admin view."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.harness import ControlPlane
from tests.operator.cluster import Cluster
from tests.operator.harness import running_operator


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    with (
        running_operator(control_plane, [namespace], tmp_path / "operator.log") as operator,
        control_plane.api_client() as api,
    ):
        yield Cluster(api, namespace, operator)
