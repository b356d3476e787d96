"""`modeldeploy-server fetch URI DEST [--sha256 HEX]`: download a model file and verify it.

Runs as an init container, so it imports neither onnxruntime nor the web stack.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from modeldeploy_server.digest import CHUNK_BYTES


class FetchError(Exception):
    """Why a fetch failed, in words for the operator's events."""


def _open_source(uri: str, timeout_s: float) -> BinaryIO:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    try:
        if scheme in ("http", "https"):
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


def fetch_model(uri: str, dest: Path, expected_sha256: str | None, timeout_s: float = 60) -> str:
    """Copy `uri` to `dest` (atomically, via a temporary file beside it); return its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with _open_source(uri, timeout_s) as source, partial.open("wb") as sink:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
                sink.write(chunk)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise FetchError(f"cannot copy {uri} to {dest}: {exc}") from None
    actual = digest.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256.lower():
        partial.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch for {uri}: expected {expected_sha256}, got {actual}")
    os.replace(partial, dest)
    return actual


def main(argv: list[str]) -> int:
    """Entry point of `modeldeploy-server fetch`."""
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server fetch",
        description="Download a model (http(s)://, file://, or a path) and verify its sha256.",
    )
    parser.add_argument("uri")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sha256", help="expected sha256 (64 hex); mismatch exits 1")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="network timeout")
    args = parser.parse_args(argv)
    try:
        actual = fetch_model(args.uri, args.dest, args.sha256, args.timeout_s)
    except FetchError as exc:
        print(f"modeldeploy-server fetch: error: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {args.uri} -> {args.dest} (sha256 {actual})")
    return 0
