"""docs/api.md is generated from the CRD, the one source of truth for the ModelDeployment API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date_with_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-P", str(REPO_ROOT / "docs" / "generate_api_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_reference_documents_every_spec_field() -> None:
    text = (REPO_ROOT / "docs" / "api.md").read_text()
    for field in ("spec.variants[].model.uri", "spec.routing.gateway.parentRefs", "spec.pod.image"):
        assert f"| `{field}` |" in text
