"""Sampled capture of request/response pairs as JSON lines, written by a background thread."""

from __future__ import annotations

import base64
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

_STOP = None


def _payload(body: bytes, content_type: str) -> Any:
    """JSON bodies are embedded as JSON, text as text, anything else as base64."""
    if "json" in content_type or not content_type:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(body).decode()}


class PayloadCapture:
    """`offer` is cheap and never blocks: it samples, then hands raw bytes to the writer thread."""

    def __init__(
        self, path: Path, sample_rate: float, on_drop: Callable[[], None], max_pending: int = 1024
    ) -> None:
        self._path = path
        self._sample_rate = sample_rate
        self._on_drop = on_drop
        self._pending: queue.Queue[tuple[Any, ...] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._write, name="capture", daemon=True)
        self._thread.start()

    def offer(
        self,
        model: str,
        version: str,
        protocol: str,
        request: bytes,
        request_type: str,
        response: bytes,
        response_type: str,
    ) -> None:
        """Maybe capture one exchange (sampled); drops rather than waits when the writer lags."""
        if random.random() >= self._sample_rate:
            return
        item = (
            time.time(),
            model,
            version,
            protocol,
            request,
            request_type,
            response,
            response_type,
        )
        try:
            self._pending.put_nowait(item)
        except queue.Full:
            self._on_drop()

    def close(self) -> None:
        """Write what is pending, then stop the thread."""
        self._pending.put(_STOP)
        self._thread.join()

    def _write(self) -> None:
        with self._path.open("ab") as stream:
            while (item := self._pending.get()) is not _STOP:
                stamp, model, version, protocol, request, request_type, response, response_type = (
                    item
                )
                record = {
                    "time": stamp,
                    "model": model,
                    "version": version,
                    "protocol": protocol,
                    "request": _payload(request, request_type),
                    "response": _payload(response, response_type),
                }
                stream.write(orjson.dumps(record) + b"\n")
                if self._pending.empty():
                    stream.flush()
