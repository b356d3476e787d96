"""tests/controlplane/build.sh: it says what it does, and refuses a Go older than GO_VERSION."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.controlplane import harness


def run_build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(harness.BUILD_SCRIPT)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_go_older_than_go_version_is_refused_up_front(tmp_path: Path) -> None:
    # An old toolchain cannot be installed here; a stand-in answers the one question asked first.
    fake = tmp_path / "bin" / "go"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "env GOVERSION" ] && echo go1.24.7 && exit 0\nexit 9\n')
    fake.chmod(0o755)

    done = run_build({"PATH": f"{fake.parent}:{os.environ['PATH']}", "HOME": str(tmp_path)})

    wanted = harness.read_versions()["GO_VERSION"]
    assert done.returncode == 2, done.stderr
    assert f"Go 1.24 is too old: these components need Go >= {wanted}" in done.stderr


def test_a_cached_build_names_each_component(
    control_plane_binaries: harness.Binaries,
) -> None:
    done = run_build({"MODELDEPLOY_CONTROLPLANE_CACHE": str(harness.cache_root())})

    assert done.returncode == 0, done.stderr
    versions = harness.read_versions()
    for component in (
        f"etcd {versions['ETCD_VERSION']}: cached at",
        f"Gateway API {versions['GATEWAY_API_VERSION']}: cached at",
        f"kubernetes {versions['KUBERNETES_VERSION']}: cached at",
        "all components ready in",
    ):
        assert component in done.stderr
