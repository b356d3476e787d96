"""The router's request path: read the request, pick a variant, forward, pass the answer back.

The edge protocol hands each proxied request straight to `Proxy` as a `ForwardCycle` (edge.py):
no ASGI application between them, and a whole answer leaves in one call. The decisions are
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
import functools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson
from starlette.types import Message, Receive

from modeldeploy_server.edge import ForwardCycle
from modeldeploy_server.health import PassiveHealth
from modeldeploy_server.mirror import Mirror, MirroredRequest
from modeldeploy_server.routing import (
    IncomingRequest,
    RouterConfig,
    RoutingError,
    TrustedProxies,
    Variant,
    passed_header_block,
    read_request_headers,
    returned_response_headers,
)
from modeldeploy_server.upstream import (
    BUFFER_LIMIT_BYTES,
    Answer,
    BodySourceError,
    Connection,
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


async def answer_json(
    cycle: ForwardCycle, status: int, document: object, variant: str | None = None
) -> None:
    """Answer with a JSON document (errors are `{"error": "..."}`)."""
    body = orjson.dumps(document)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if variant is not None:
        headers.append((b"x-model-variant", variant.encode("latin-1")))
    await cycle.answer(status, headers, body)


class Routed(Protocol):
    """Where the current routes are (the router): read once per request."""

    config: RouterConfig


class Job:
    """One request being forwarded: the routing decision and what is sent."""

    __slots__ = (
        "body", "config", "cycle", "ejected", "head", "incoming", "method", "pinned", "rand",
        "started", "target", "variant",
    )  # fmt: skip

    def __init__(
        self,
        cycle: ForwardCycle,
        started: float,
        config: RouterConfig,
        incoming: IncomingRequest,
        pinned: str | None,
        rand: float,
        ejected: frozenset[str],
        variant: Variant,
    ) -> None:
        self.cycle = cycle
        self.started = started
        self.config = config
        self.incoming = incoming
        self.pinned = pinned
        self.rand = rand
        self.ejected = ejected
        self.variant = variant
        scope = cycle.scope
        self.method: str = scope["method"]
        query: bytes = scope["query_string"]
        raw_path: bytes = scope["raw_path"]
        self.target = raw_path + b"?" + query if query else raw_path
        self.body: bytes | AsyncIterator[bytes] = b""
        self.head = b""


class Proxy:
    """Forwards requests; shares the pools, health and metrics."""

    def __init__(
        self,
        settings: ProxySettings,
        routes: Routed,
        upstream: Upstream,
        metrics: RouterMetrics,
        mirror: Mirror,
    ) -> None:
        self._settings = settings
        self._mirror = mirror
        self._routes = routes
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

    def start(self, cycle: ForwardCycle) -> bool:
        """The edge's entry for a request that arrived whole: forward it now on an idle
        connection, and answer from that connection's callback, without a task. False (the edge
        then runs `__call__` as a task) when the request needs waiting: no idle connection to
        its variant, a chunked body, or no variant to route it to (answered there)."""
        # `__call__` goes on with this decision: drawing again there would favour the variants
        # that have idle connections (the busy ones) over the weights.
        job = cycle.routed = self._route(cycle)
        if isinstance(job, RoutingError) or job.incoming.chunked:
            return False
        pool = self._upstream.pool(job.variant.url)
        connection = pool.take_idle()
        if connection is None:
            return False
        job.body = body = bytes(cycle.body)
        cycle.body.clear()
        job.head = head = request_head(job.incoming, body)
        method = job.method
        connection.start(
            pool.request_line(method.encode("ascii"), job.target) + head + body,
            head_only=method == "HEAD",
            timeout_s=self._settings.timeout_s,
            done=functools.partial(self._answered, job),
        )
        return True

    def _answered(self, job: Job, connection: Connection) -> None:
        """The variant answered (or failed) a request `start` sent: answer the client."""
        cycle = job.cycle
        try:
            try:
                answer = connection.result()
            except UpstreamError as exc:
                # A kept-alive connection the variant closed as the request went out: sent again
                # on a new connection to it (`fresh`), as `_exchange` does; other failures are
                # handled as there.
                fresh = exc.replayable
                cycle.spawn(self._forward(job, fresh=fresh, failed=None if fresh else exc))
                return
            self.health.record_success(job.variant.name)
            body = answer.body
            if body is not None:
                variant = job.variant
                block = passed_header_block(answer.header_block, variant)
                if block is not None:
                    answered = cycle.answer_passed(answer.status, block, body)
                else:
                    headers = returned_response_headers(answer.headers, variant.name)
                    answered = cycle.answer_now(answer.status, headers, body)
                if answered:
                    self._done(job, answer, answer.status)
                    return
            cycle.spawn(self._deliver(job, answer))
        except Exception as exc:  # as in a task: the client must not wait for nothing
            cycle.fail(exc)

    async def _deliver(self, job: Job, answer: Answer) -> None:
        """Pass on an answer that streams, or that waits for the client to read."""
        status = await self._answer(job.cycle, answer, job.variant)
        self._done(job, answer, status)

    async def __call__(self, cycle: ForwardCycle) -> None:
        """Route (unless `start` did), forward and answer one request (the edge's forwarder, in
        a task)."""
        job = self._route(cycle) if cycle.routed is None else cycle.routed
        if isinstance(job, RoutingError):
            self._metrics.count_unrouted(job.status)
            await answer_json(cycle, job.status, {"error": str(job)})
            return
        receive: Receive = cycle.receive  # type: ignore[assignment]
        try:
            job.body = await self._request_body(receive, job.incoming)
        except ClientGone:
            self._observe(job, CLIENT_CLOSED_REQUEST)
            return
        job.head = request_head(job.incoming, job.body)
        await self._forward(job, fresh=False)

    def _route(self, cycle: ForwardCycle) -> Job | RoutingError:
        """The routing decision for a request, or why none could be made."""
        started = time.perf_counter()
        config = self._routes.config  # one snapshot per request; a reload swaps it whole
        scope = cycle.scope
        client = scope["client"]
        incoming = read_request_headers(
            scope["headers"],  # type: ignore[arg-type]
            config,
            client[0] if client else None,
            self._settings.trusted,
        )
        pinned = config.pinned_variant(scope["path"], incoming.override)
        rand = random.random()
        ejected = self.health.ejected(time.monotonic())
        try:
            variant = config.choose(pinned, rand, incoming.sticky, ejected)
        except RoutingError as exc:
            return exc
        return Job(cycle, started, config, incoming, pinned, rand, ejected, variant)

    async def _forward(self, job: Job, *, fresh: bool, failed: UpstreamError | None = None) -> None:
        """Exchange with the chosen variant (once more with another if it refused), answer.

        `fresh`: the first exchange goes on a new connection; `failed`: the first exchange
        already failed so (`start`'s)."""
        cycle, config, variant, body = job.cycle, job.config, job.variant, job.body
        try:
            try:
                if failed is not None:
                    raise failed
                answer = await self._exchange(variant, job, fresh=fresh)
            except UpstreamError as exc:
                self._count_failure(variant, exc)
                avoid = job.ejected | {variant.name}
                other = config.choose(None, job.rand, job.incoming.sticky, avoid)
                if not (exc.replayable and job.pinned is None and isinstance(body, bytes)):
                    raise BackendError(variant, exc) from None
                if other is variant:
                    raise BackendError(variant, exc) from None
                self._metrics.count_retry(variant.name)
                log.warning(
                    "%s %s: variant %r: %s; sent to %r instead",
                    job.method,
                    cycle.scope["path"],
                    variant.name,
                    exc,
                    other.name,
                )
                variant = job.variant = other
                try:
                    answer = await self._exchange(variant, job, fresh=False)
                except UpstreamError as again:
                    self._count_failure(variant, again)
                    raise BackendError(variant, again) from None
            status = await self._answer(cycle, answer, variant)
            self._done(job, answer, status)
        except BackendError as exc:
            status = _STATUS_OF_REASON[exc.error.reason]
            log.warning("%s %s: %s", job.method, cycle.scope["path"], exc)
            await answer_json(cycle, status, {"error": str(exc)}, variant.name)
            self._observe(job, status)
        except ClientGone:
            self._observe(job, CLIENT_CLOSED_REQUEST)

    def _done(self, job: Job, answer: Answer, status: int) -> None:
        """After the answer: offer a copy to the shadow variant, if any; count the request."""
        shadow = job.config.shadow
        body = job.body
        if (
            shadow is not None
            and job.pinned is None
            and not job.incoming.probe
            and isinstance(body, bytes)
            and answer.body is not None
            and random.random() * 100 < shadow.percent
        ):
            self._mirror.offer(
                MirroredRequest(
                    primary=job.variant.name,
                    shadow=shadow,
                    shadow_url=job.config.choose(shadow.variant, 0.0).url,
                    method=job.method.encode("ascii"),
                    target=job.target,
                    head=job.head,
                    body=body,
                    answer=answer.body,
                )
            )
        observe = self._metrics.observe_probe if job.incoming.probe else self._metrics.observe
        observe(job.variant.name, status, time.perf_counter() - job.started)

    def _observe(self, job: Job, status: int) -> None:
        observe = self._metrics.observe_probe if job.incoming.probe else self._metrics.observe
        observe(job.variant.name, status, time.perf_counter() - job.started)

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

    async def _exchange(self, variant: Variant, job: Job, *, fresh: bool) -> Answer:
        pool = self._upstream.pool(variant.url)
        connection = await (pool.connect() if fresh else pool.acquire())
        method = job.method
        request = pool.request_line(method.encode("ascii"), job.target) + job.head
        head_only = method == "HEAD"
        body, chunked = job.body, job.incoming.chunked
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

    async def _answer(self, cycle: ForwardCycle, answer: Answer, variant: Variant) -> int:
        headers = returned_response_headers(answer.headers, variant.name)
        if answer.body is not None:
            await cycle.answer(answer.status, headers, answer.body)
            return answer.status
        send = cycle.send
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        connection = answer.connection
        try:
            async for chunk in connection.chunks(self._settings.timeout_s):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            # The status line is gone already: returning without finishing the body makes the
            # cycle close the connection, so the client sees a cut answer, not a short valid one.
            self._count_failure(variant, exc)
            log.warning("variant %r broke off its answer: %s", variant.name, exc)
            return answer.status
        finally:
            connection.release()
        await send({"type": "http.response.body", "body": b""})
        return answer.status


def request_head(incoming: IncomingRequest, body: bytes | AsyncIterator[bytes]) -> bytes:
    """The forwarded header lines and the body's framing, ending with the blank line."""
    lines = []
    for header in incoming.forwarded_headers:  # a loop: a comprehension is a call of its own
        lines.append(b"%s: %s\r\n" % header)
    if isinstance(body, bytes):
        if body or incoming.content_length is not None:
            lines.append(b"content-length: %d\r\n" % len(body))
    elif incoming.chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    else:
        lines.append(b"content-length: %d\r\n" % (incoming.content_length or 0))
    lines.append(b"\r\n")
    return b"".join(lines)
