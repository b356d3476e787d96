"""`modeldeploy-server fetch`: file://, plain paths and http:// (a loopback http.server)."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.models import BuiltModel
from tests.processes import server_command

FETCH = [*server_command(), "fetch"]


@pytest.fixture(scope="module")
def http_root(iris: BuiltModel) -> Iterator[str]:
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(iris.path.parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FETCH, *args], capture_output=True, text=True, timeout=60)


def test_fetch_from_every_kind_of_uri(iris: BuiltModel, http_root: str, tmp_path: Path) -> None:
    for index, uri in enumerate(
        [str(iris.path), iris.path.as_uri(), f"{http_root}/{iris.path.name}"]
    ):
        dest = tmp_path / f"sub{index}" / "model.onnx"
        result = fetch(uri, str(dest), "--sha256", iris.sha256.upper())
        assert result.returncode == 0, result.stderr
        assert dest.read_bytes() == iris.path.read_bytes()
        assert iris.sha256 in result.stdout
        assert list(dest.parent.iterdir()) == [dest]


def test_sha256_mismatch_fails_and_leaves_nothing(
    iris: BuiltModel, http_root: str, tmp_path: Path
) -> None:
    dest = tmp_path / "model.onnx"
    result = fetch(f"{http_root}/{iris.path.name}", str(dest), "--sha256", "f" * 64)
    assert result.returncode == 1
    assert (
        f"sha256 mismatch for {http_root}/{iris.path.name}: expected {'f' * 64}, got {iris.sha256}"
        in result.stderr
    )
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("{http}/absent.onnx", "HTTP 404"),
        ("file:///nonexistent/model.onnx", "cannot read file:///nonexistent/model.onnx"),
        ("/nonexistent/model.onnx", "cannot read /nonexistent/model.onnx"),
        ("s3://bucket/model.onnx", "unsupported URI scheme 's3'"),
        ("file://otherhost/model.onnx", "names a host"),
        ("http://127.0.0.1:1/model.onnx", "cannot download"),
    ],
)
def test_failures_exit_non_zero_with_a_clear_message(
    http_root: str, tmp_path: Path, uri: str, message: str
) -> None:
    result = fetch(uri.format(http=http_root), str(tmp_path / "model.onnx"))
    assert result.returncode == 1
    assert result.stderr.startswith("modeldeploy-server fetch: error: ")
    assert message in result.stderr
    assert not (tmp_path / "model.onnx").exists()
