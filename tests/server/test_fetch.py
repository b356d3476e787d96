"""`modeldeploy-server fetch`: file://, plain paths and http:// (a loopback http.server), and
the sources and destinations that must fail cleanly (hostile servers, planted symlinks)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.models import BuiltModel
from tests.processes import server_command

FETCH = [*server_command(), "fetch"]


class HostileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the model directory, plus paths that lie about or drip their bodies."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/truncated.onnx":  # declares 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
        elif self.path == "/endless.onnx":  # no length, never ends
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(100_000):
                    self.wfile.write(b"x" * 65536)
        elif self.path == "/trickle.onnx":  # one byte a second, for a minute
            self.send_response(200)
            self.send_header("Content-Length", "60")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(60):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
        else:
            super().do_GET()


@pytest.fixture(scope="module")
def http_root(iris: BuiltModel) -> Iterator[str]:
    handler = functools.partial(HostileHandler, directory=str(iris.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
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
    result = fetch(uri.format(http=http_root), str(tmp_path / "model.onnx"), "--sha256", "0" * 64)
    assert result.returncode == 1
    assert result.stderr.startswith("modeldeploy-server fetch: error: ")
    assert message in result.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_remote_source_needs_a_digest_or_a_loud_opt_out(
    iris: BuiltModel, http_root: str, tmp_path: Path
) -> None:
    uri, dest = f"{http_root}/{iris.path.name}", tmp_path / "model.onnx"
    refused = fetch(uri, str(dest))
    assert refused.returncode == 2
    assert "--sha256 is required for " + uri in refused.stderr
    assert list(tmp_path.iterdir()) == []
    allowed = fetch(uri, str(dest), "--insecure-no-digest")
    assert allowed.returncode == 0, allowed.stderr
    assert "WARNING" in allowed.stderr and "not pinned by a sha256" in allowed.stderr
    assert dest.read_bytes() == iris.path.read_bytes()


def test_planted_symlinks_are_never_written_through(
    iris: BuiltModel, http_root: str, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    models = tmp_path / "models"
    models.mkdir()
    dest = models / "model.onnx"
    (models / "model.onnx.part").symlink_to(victim)
    uri = f"{http_root}/{iris.path.name}"
    assert fetch(uri, str(dest), "--sha256", "f" * 64).returncode == 1
    assert fetch(uri, str(dest), "--sha256", iris.sha256).returncode == 0
    dest.unlink()
    dest.symlink_to(victim)  # a link at DEST itself is replaced, its target untouched
    assert fetch(uri, str(dest), "--sha256", iris.sha256).returncode == 0
    assert victim.read_bytes() == b"precious"
    assert not dest.is_symlink() and dest.read_bytes() == iris.path.read_bytes()
    assert sorted(p.name for p in models.iterdir()) == ["model.onnx", "model.onnx.part"]


@pytest.mark.parametrize(
    ("path", "args", "message"),
    [
        ("{model}", ["--max-bytes", "100"], "over the --max-bytes limit of 100"),
        ("endless.onnx", ["--max-bytes", "1000000"], "over the --max-bytes limit of 1000000"),
        ("truncated.onnx", [], "got 10 of its 1000 bytes"),
    ],
)
def test_oversized_and_truncated_bodies_fail_and_leave_nothing(
    iris: BuiltModel, http_root: str, tmp_path: Path, path: str, args: list[str], message: str
) -> None:
    uri = f"{http_root}/{path.format(model=iris.path.name)}"
    result = fetch(uri, str(tmp_path / "model.onnx"), "--sha256", "0" * 64, *args)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_timeout_bounds_the_whole_download(http_root: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = fetch(
        f"{http_root}/trickle.onnx",
        str(tmp_path / "m.onnx"),
        "--insecure-no-digest",
        "--timeout-s",
        "2",
    )
    # The server would drip for 60 s, each read well inside a per-read timeout.
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert "not complete within 2 s" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_download_leaves_nothing(http_root: str, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*FETCH, f"{http_root}/trickle.onnx", str(tmp_path / "m.onnx"), "--insecure-no-digest"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".m.onnx.*.part")):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert "stopped by SIGTERM" in stderr
    assert list(tmp_path.iterdir()) == []


def test_unusable_destinations_fail_in_one_line(iris: BuiltModel, tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    for dest, message in [
        (tmp_path, f"destination {tmp_path} is a directory; give a file path"),
        (file / "m.onnx", f"destination {file / 'm.onnx'}: {file} is not a directory"),
        (file / "a" / "m.onnx", f"destination {file / 'a' / 'm.onnx'}: {file} is not a directory"),
    ]:
        result = fetch(str(iris.path), str(dest), "--sha256", iris.sha256)
        assert result.returncode == 1
        assert result.stderr == f"modeldeploy-server fetch: error: {message}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
