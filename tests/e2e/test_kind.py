"""The kind end-to-end script, run as a test: it skips, with the script's reason, on hosts
without a Docker engine, kind or kubectl, and must pass everywhere else."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("kind.sh")


@pytest.mark.slow
def test_kind_end_to_end() -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1800, check=False
    )
    if result.returncode == 0 and result.stdout.startswith("SKIP: "):
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "=== passed" in result.stdout
