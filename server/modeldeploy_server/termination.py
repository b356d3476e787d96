"""Kubernetes termination messages: a Job container's outcome as JSON, bounded as the kubelet
keeps it (4096 bytes), for `batch` and `gate`."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

MESSAGE_LIMIT = 4096


def write_termination_message(
    path: Path | None, document: Mapping[str, Any], shorter: Mapping[str, Any], program: str
) -> None:
    """Write `document` as JSON to `path`, or `shorter` when it is over the limit (nothing when
    `path` is None); a failure to write is reported on stderr, not raised."""
    if path is None:
        return
    data = orjson.dumps(document)
    if len(data) > MESSAGE_LIMIT:
        data = orjson.dumps(shorter)
    try:
        path.write_bytes(data)
    except OSError as exc:
        print(f"{program}: cannot write {path}: {exc}", file=sys.stderr)
