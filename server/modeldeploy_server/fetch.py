"""`modeldeploy-server fetch URI DEST --sha256 HEX`: download a model file and verify it.

Runs as an init container, so it imports neither onnxruntime nor the web stack. The bytes go to a
new file of its own in DEST's directory (created with O_EXCL, never through a symlink), renamed
over DEST only once the size and digest check out; any failure removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import signal
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from modeldeploy_operator.contract import MAX_MODEL_BYTES
from modeldeploy_server.digest import CHUNK_BYTES

REMOTE_SCHEMES = ("http", "https")


class FetchError(Exception):
    """Why a fetch failed, in words for the operator's events."""


def open_source(uri: str, timeout_s: float) -> BinaryIO:
    """Open http(s)://, file:// or a path for reading; raises FetchError saying why not."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    try:
        if scheme in REMOTE_SCHEMES:
            response: BinaryIO = urllib.request.urlopen(uri, timeout=timeout_s)
            return response
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise FetchError(f"file URI {uri!r} names a host; use file:///absolute/path")
            return Path(url2pathname(parts.path)).open("rb")
        if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return Path(uri).open("rb")
    except urllib.error.HTTPError as exc:
        raise FetchError(f"cannot download {uri}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot download {uri}: {exc.reason}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {uri}: {exc.strerror or exc}") from None
    raise FetchError(
        f"unsupported URI scheme {scheme!r} in {uri!r}; use http(s)://, file:// or a path"
    )


def is_remote(uri: str) -> bool:
    """True for http(s):// sources, whose bytes must be pinned by a digest."""
    return urlsplit(uri).scheme.lower() in REMOTE_SCHEMES


@contextlib.contextmanager
def _deadline(uri: str, timeout_s: float) -> Iterator[None]:
    """Raise FetchError once the whole fetch has taken timeout_s, even inside a blocked read.

    A per-read socket timeout lets a server that trickles one byte a second go on forever; an
    interval timer interrupts whatever is blocking (main thread only: this is a CLI).
    """

    def expire(_sig: int, _frame: FrameType | None) -> None:
        raise FetchError(f"cannot download {uri}: not complete within {timeout_s:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def declared_length(source: BinaryIO) -> int | None:
    """The Content-Length of an HTTP response, None for other sources or when there is none."""
    headers = getattr(source, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value is not None and value.strip().isdigit() else None


def _check_destination(dest: Path) -> None:
    if dest.is_dir():
        raise FetchError(f"destination {dest} is a directory; give a file path")
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FetchError(f"destination {dest}: {parent} is not a directory")
            return


def _copy(uri: str, source: BinaryIO, sink: BinaryIO, max_bytes: int) -> str:
    """Copy source to sink, refusing past max_bytes or short of a declared length; the sha256."""
    declared = declared_length(source)
    if declared is not None and declared > max_bytes:
        raise FetchError(f"{uri} is {declared} bytes, over the --max-bytes limit of {max_bytes}")
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"{uri} is over the --max-bytes limit of {max_bytes} bytes")
        digest.update(chunk)
        sink.write(chunk)
    if declared is not None and size != declared:
        raise FetchError(f"cannot download {uri}: got {size} of its {declared} bytes")
    return digest.hexdigest()


def fetch_model(
    uri: str,
    dest: Path,
    expected_sha256: str | None,
    timeout_s: float = 60,
    max_bytes: int = MAX_MODEL_BYTES,
) -> str:
    """Copy `uri` to `dest` within timeout_s in all, via a new file beside it; its sha256."""
    _check_destination(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp opens with O_CREAT | O_EXCL | O_NOFOLLOW: a name nobody else holds, never a
        # symlink planted in the directory.
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise FetchError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from None
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as sink:
            os.fchmod(sink.fileno(), 0o644)
            with _deadline(uri, timeout_s), open_source(uri, timeout_s) as source:
                actual = _copy(uri, source, sink, max_bytes)
            sink.flush()
            os.fsync(sink.fileno())
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise FetchError(f"sha256 mismatch for {uri}: expected {expected_sha256}, got {actual}")
        os.replace(partial, dest)
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise FetchError(f"cannot copy {uri} to {dest}: {reason}") from None
    finally:
        partial.unlink(missing_ok=True)
    return actual


def _stop(_sig: int, _frame: FrameType | None) -> None:
    raise FetchError("stopped by SIGTERM")


def main(argv: list[str]) -> int:
    """Entry point of `modeldeploy-server fetch`."""
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server fetch",
        description="Download a model (http(s)://, file://, or a path) and verify its sha256.",
    )
    parser.add_argument("uri")
    parser.add_argument("dest", type=Path)
    parser.add_argument(
        "--sha256", help="expected sha256 (64 hex); required for http(s)://; mismatch exits 1"
    )
    parser.add_argument(
        "--insecure-no-digest",
        action="store_true",
        help="accept an http(s):// download without --sha256 (nothing checks what arrived)",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=60.0, help="time limit for the whole download"
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_MODEL_BYTES,
        help=f"refuse a model larger than this (default {MAX_MODEL_BYTES}, ONNX's 2 GiB limit)",
    )
    args = parser.parse_args(argv)
    if not args.timeout_s > 0 or not args.max_bytes > 0:
        parser.error("--timeout-s and --max-bytes must be positive")
    if args.sha256 is None and is_remote(args.uri):
        if not args.insecure_no_digest:
            parser.error(f"--sha256 is required for {args.uri} (or pass --insecure-no-digest)")
        print(
            f"modeldeploy-server fetch: WARNING: {args.uri} is not pinned by a sha256 "
            "(--insecure-no-digest): whatever the server sends will be served",
            file=sys.stderr,
        )
    signal.signal(signal.SIGTERM, _stop)
    try:
        actual = fetch_model(args.uri, args.dest, args.sha256, args.timeout_s, args.max_bytes)
    except FetchError as exc:
        print(f"modeldeploy-server fetch: error: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {args.uri} -> {args.dest} (sha256 {actual})")
    return 0
