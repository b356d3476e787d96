"""The router's request path: read the request, pick a variant, forward, pass the answer back.

Plain ASGI (no Starlette Request/Response: a proxy needs none of their parsing). The decisions are
`modeldeploy_server.routing` and `modeldeploy_server.health` (pure); the wire is
`modeldeploy_server.upstream`. The rules this module keeps:

- A request body is forwarded with the length the client declared (no re-chunking), so a variant
  can refuse an oversized one before it arrives; a client that sends less than it declared gets
  408 from the edge protocol (`--read-timeout-s`). Chunked bodies stay chunked; trailers are
  never forwarded.
- A variant that refuses the connection, or closes it before any byte of an answer, is ejected
  for a short, growing time and the request goes once to another variant, if it named none and
  its body is still at hand. A timeout or a broken answer ejects too but is never replayed: the
  variant may have acted on the request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from starlette.types import Message, Receive, Scope, Send

from modeldeploy_server.health import PassiveHealth
from modeldeploy_server.mirror import Mirror, MirroredRequest
from modeldeploy_server.routing import (
    IncomingRequest,
    RouterConfig,
    RoutingError,
    TrustedProxies,
    Variant,
    read_request_headers,
    returned_response_headers,
)
from modeldeploy_server.upstream import (
    BUFFER_LIMIT_BYTES,
    Answer,
    BodySourceError,
    Upstream,
    UpstreamError,
)

if TYPE_CHECKING:
    from modeldeploy_server.router import RouterMetrics

log = logging.getLogger("modeldeploy.router")

# The status nginx made conventional for "the client closed the connection first"; only a label.
CLIENT_CLOSED_REQUEST = 499
_STATUS_OF_REASON = {"unreachable": 502, "reset": 502, "broken": 502, "timeout": 504}
_SUMMARY_OF_REASON = {
    "unreachable": "cannot connect",
    "reset": "connection closed before any answer",
    "broken": "connection failed",
    "timeout": "no answer in time",
}


class BackendError(Exception):
    """A variant did not answer; `error` says how."""

    def __init__(self, variant: Variant, error: UpstreamError) -> None:
        summary = _SUMMARY_OF_REASON[error.reason]
        super().__init__(f"variant {variant.name!r} at {variant.url}: {summary}: {error}")
        self.error = error


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


@dataclass(frozen=True)
class ProxySettings:
    """The waits and trust rules of the request path."""

    timeout_s: float  # for a variant's answer (its head, then each piece of a streamed body)
    trusted: TrustedProxies


async def send_json(send: Send, status: int, document: object, variant: str | None = None) -> None:
    """Answer with a JSON document (errors are `{"error": "..."}`)."""
    body = orjson.dumps(document)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if variant is not None:
        headers.append((b"x-model-variant", variant.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Proxy:
    """Forwards one request at a time per call; shares the pools, health and metrics."""

    def __init__(
        self,
        settings: ProxySettings,
        current: Callable[[], RouterConfig],
        upstream: Upstream,
        metrics: RouterMetrics,
        mirror: Mirror,
    ) -> None:
        self._settings = settings
        self._mirror = mirror
        self._current = current
        self._upstream = upstream
        self._metrics = metrics
        self.health = PassiveHealth()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve requests inside the block (run in the lifespan); close idle connections after."""
        try:
            async with self._mirror.running():
                yield
        finally:
            self._upstream.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route, forward and answer one request."""
        started = time.perf_counter()
        config = self._current()  # one snapshot per request; a reload swaps it whole
        client = scope.get("client")
        incoming = read_request_headers(
            scope["headers"], config, client[0] if client else None, self._settings.trusted
        )
        pinned = config.pinned_variant(scope["path"], incoming.override)
        rand = random.random()
        ejected = self.health.ejected(time.monotonic())
        try:
            variant = config.choose(pinned, rand, incoming.sticky, ejected)
        except RoutingError as exc:
            self._metrics.count_unrouted(exc.status)
            await send_json(send, exc.status, {"error": str(exc)})
            return
        try:
            body = await self._request_body(receive, incoming)
            head = request_head(incoming, body)
            try:
                answer = await self._exchange(variant, scope, head, body, incoming.chunked)
            except UpstreamError as exc:
                self._count_failure(variant, exc)
                other = config.choose(None, rand, incoming.sticky, ejected | {variant.name})
                if not (exc.replayable and pinned is None and isinstance(body, bytes)):
                    raise BackendError(variant, exc) from None
                if other is variant:
                    raise BackendError(variant, exc) from None
                self._metrics.count_retry(variant.name)
                log.warning(
                    "%s %s: variant %r: %s; sent to %r instead",
                    scope["method"],
                    scope["path"],
                    variant.name,
                    exc,
                    other.name,
                )
                variant = other
                try:
                    answer = await self._exchange(variant, scope, head, body, incoming.chunked)
                except UpstreamError as again:
                    self._count_failure(variant, again)
                    raise BackendError(variant, again) from None
            status = await self._answer(send, answer, variant)
            shadow = config.shadow
            if (
                shadow is not None
                and pinned is None
                and not incoming.probe
                and isinstance(body, bytes)
                and answer.body is not None
                and random.random() * 100 < shadow.percent
            ):
                self._mirror.offer(
                    MirroredRequest(
                        primary=variant.name,
                        shadow=shadow,
                        shadow_url=config.choose(shadow.variant, 0.0).url,
                        method=scope["method"].encode("ascii"),
                        target=_target(scope),
                        head=head,
                        body=body,
                        answer=answer.body,
                    )
                )
        except BackendError as exc:
            status = _STATUS_OF_REASON[exc.error.reason]
            log.warning("%s %s: %s", scope["method"], scope["path"], exc)
            await send_json(send, status, {"error": str(exc)}, variant.name)
        except ClientGone:
            status = CLIENT_CLOSED_REQUEST
        observe = self._metrics.observe_probe if incoming.probe else self._metrics.observe
        observe(variant.name, status, time.perf_counter() - started)

    def _count_failure(self, variant: Variant, exc: UpstreamError) -> None:
        """Count a variant's failure, and eject it if it was not already."""
        self._metrics.count_backend_error(variant.name, exc.reason)
        seconds = self.health.record_failure(variant.name, time.monotonic())
        if seconds is not None:
            self._metrics.count_ejection(variant.name)
            log.warning("variant %r ejected for %.1f s: %s", variant.name, seconds, exc)

    async def _request_body(
        self, receive: Receive, incoming: IncomingRequest
    ) -> bytes | AsyncIterator[bytes]:
        """The whole body when it is small and sized, else a stream of it."""
        length = incoming.content_length
        if length is not None and length <= BUFFER_LIMIT_BYTES and not incoming.chunked:
            # Most small bodies arrive in one message: read it here, without further calls.
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            body: bytes = message.get("body", b"")
            if message.get("more_body", False):
                body += b"".join([chunk async for chunk in self._stream_body(receive)])
            return body
        if length is not None or incoming.chunked:
            return self._stream_body(receive)
        return b""

    async def _stream_body(self, receive: Receive) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive(receive)
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    async def _receive(self, receive: Receive) -> Message:
        # No timer here: the edge protocol (edge.py) answers 408 and closes the connection when a
        # request does not arrive whole within --read-timeout-s, and `receive` then says so.
        message = await receive()
        if message["type"] == "http.disconnect":
            # Raising aborts the upload to the variant rather than ending it as a short, valid body.
            raise ClientGone
        return message

    async def _exchange(
        self,
        variant: Variant,
        scope: Scope,
        head: bytes,
        body: bytes | AsyncIterator[bytes],
        chunked: bool,
    ) -> Answer:
        pool = self._upstream.pool(variant.url)
        connection = await pool.acquire()
        request = pool.request_line(scope["method"].encode("ascii"), _target(scope)) + head
        head_only = scope["method"] == "HEAD"
        timeout_s = self._settings.timeout_s
        try:
            try:
                answer = await connection.exchange(
                    request, body, head_only=head_only, chunked=chunked, timeout_s=timeout_s
                )
            except UpstreamError as exc:
                if not (exc.replayable and connection.reused and isinstance(body, bytes)):
                    raise
                # A kept-alive connection the variant closed as the request went out: the
                # variant itself is fine, so the request goes again on a new connection to it.
                connection = await pool.connect()
                answer = await connection.exchange(
                    request, body, head_only=head_only, chunked=chunked, timeout_s=timeout_s
                )
        except BodySourceError as exc:
            # The client, not the variant, failed.
            assert exc.__cause__ is not None
            raise exc.__cause__ from None
        self.health.record_success(variant.name)
        return answer

    async def _answer(self, send: Send, answer: Answer, variant: Variant) -> int:
        headers = returned_response_headers(answer.headers, variant.name)
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        if answer.body is not None:
            await send({"type": "http.response.body", "body": answer.body})
            return answer.status
        connection = answer.connection
        try:
            async for chunk in connection.chunks(self._settings.timeout_s):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            # The status line is gone already: returning without finishing the body makes uvicorn
            # close the connection, so the client sees a cut answer rather than a short, valid one.
            self._count_failure(variant, exc)
            log.warning("variant %r broke off its answer: %s", variant.name, exc)
            return answer.status
        finally:
            connection.release()
        await send({"type": "http.response.body", "body": b""})
        return answer.status


def _target(scope: Scope) -> bytes:
    raw_path: bytes = scope["raw_path"]
    query: bytes = scope["query_string"]
    return raw_path + b"?" + query if query else raw_path


def request_head(incoming: IncomingRequest, body: bytes | AsyncIterator[bytes]) -> bytes:
    """The forwarded header lines and the body's framing, ending with the blank line."""
    lines = [b"%s: %s\r\n" % header for header in incoming.forwarded_headers]
    if isinstance(body, bytes):
        if body or incoming.content_length is not None:
            lines.append(b"content-length: %d\r\n" % len(body))
    elif incoming.chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    else:
        lines.append(b"content-length: %d\r\n" % (incoming.content_length or 0))
    lines.append(b"\r\n")
    return b"".join(lines)
