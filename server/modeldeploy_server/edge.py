"""uvicorn's httptools protocol with the limits it lacks, for `serve` and `route` alike.

uvicorn bounds neither the request head, nor the number of connections before it parses them, nor
how long a request may take to arrive, nor the memory of bodies in flight; httptools hands chunked
trailers to the same callback as headers. This subclass adds each of those at the protocol layer,
answers every refusal it makes in JSON, and closes connections politely (the answer first, then
a short linger that discards what the client still sends, so the answer is not lost to a reset).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import urllib.parse
from asyncio import TimerHandle
from collections.abc import Awaitable, Collection, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools
from uvicorn._types import ASGI3Application, ASGIReceiveEvent, ASGISendEvent, HTTPScope
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.server import ServerState

from modeldeploy_server.config import EdgeSettings

logger = logging.getLogger("uvicorn.error")

# How long a refused connection stays open before it is closed, and how much of what the client
# still sends it reads (and discards) meanwhile: enough for the client to finish writing a request
# and read the answer, never enough for a client streaming gigabytes to keep the loop busy.
LINGER_S = 2.0
LINGER_READ_BYTES = 1024 * 1024
# What `OPTIONS *` answers: the methods this server's routes accept.
ALLOWED_METHODS = b"GET, HEAD, POST"
# An application that refuses a request because it is overloaded sets
# scope["state"][BACKOFF_STATE_KEY] to the seconds of its Retry-After: that connection then reads
# nothing more for that long. Clients that retry at once (ignoring Retry-After) would otherwise
# keep the event loop busy refusing them, and the admitted requests would starve.
BACKOFF_STATE_KEY = "modeldeploy.backoff_s"
# What a request that expects it gets before its body is read.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The read and keep-alive timeouts are checked this many times per the shorter of the two, by one
# sweep over the connections (not a timer per request): each fires between its time and a quarter
# of the shorter one later.
SWEEPS_PER_TIMEOUT = 4
# uvicorn's patterns for the bytes a header name and a header value must not hold, as tables
# that map those bytes to NUL (itself one of them) and keep the others: a name or value is valid
# when its translation (bytes.translate, a C loop that needs no table built per call) holds no
# NUL, which costs a fraction of a regular-expression search over the same bytes.
_NAME_CHECK = bytes(0 if HEADER_RE.match(bytes([b])) else b for b in range(256))
_VALUE_CHECK = bytes(0 if HEADER_VALUE_RE.match(bytes([b])) else b for b in range(256))


@dataclass
class Edge:
    """Process-wide state the protocol instances share (one per uvicorn server)."""

    settings: EdgeSettings
    body_bytes_in_flight: int = 0
    # Set at SIGTERM: every answer from now on closes its connection.
    draining: bool = False
    # The next sweep of the connections' timeouts, while there are connections.
    _sweep: TimerHandle | None = field(default=None, init=False, repr=False)
    # Answer heads held in this turn of the loop (HeadHolder).
    held_heads: list[HeadHolder] = field(default_factory=list, init=False, repr=False)
    # Where requests go instead of the ASGI application (the router's proxy), if anywhere: every
    # request but those for `local_paths` (the process's own endpoints).
    forward: Forwarder | None = None
    local_paths: frozenset[str] = frozenset()

    def watch(self, loop: asyncio.AbstractEventLoop, connections: Collection[object]) -> None:
        """Sweep `connections` (the server's EdgeProtocols) for timeouts while there are any."""
        if self._sweep is None:
            settings = self.settings
            interval = min(settings.read_timeout_s, settings.keepalive_timeout_s)
            self._sweep = loop.call_later(
                interval / SWEEPS_PER_TIMEOUT, self._sweep_once, loop, connections
            )

    def _sweep_once(self, loop: asyncio.AbstractEventLoop, connections: Collection[object]) -> None:
        self._sweep = None
        now = loop.time()
        for protocol in list(connections):
            if isinstance(protocol, EdgeProtocol):
                protocol.check_timeouts(now)
        if connections:
            self.watch(loop, connections)


def render_refusal(status: int, message: str, *, retry_after: bool = False) -> bytes:
    """A complete HTTP/1.1 answer `{"error": message}` that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class HeadHolder:
    """The connection's transport as uvicorn's request cycles see it, holding the head of an
    answer (EdgeCycle.send) until the first piece of its body, so that a small answer leaves in
    one write.

    uvicorn writes the status line and headers, then the body, in two calls; on a TCP_NODELAY
    socket that is two syscalls, two segments and two wake-ups of the client per answer. A head
    never waits longer than the current turn of the event loop (an answer whose body comes later):
    it is written then, or before anything else the connection writes or closes. The heads held
    in one turn are written by one callback (`flush_all`), not one each.
    """

    __slots__ = ("_loop", "_pending", "held", "transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        pending: list[HeadHolder],
    ) -> None:
        self.transport = transport
        self._loop = loop
        # The server's holders with a head held in this turn of the loop (shared by all).
        self._pending = pending
        # The head waiting for its body.
        self.held: bytes | None = None

    def hold(self, head: bytes) -> None:
        """Keep `head` until its body's first piece, or the end of this turn of the loop."""
        self.held = head
        pending = self._pending
        if not pending:
            self._loop.call_soon(self.flush_all, pending)
        pending.append(self)

    def write(self, data: bytes) -> None:
        """Write after what is held (uvicorn's `100 Continue` goes before any head)."""
        self.flush()
        self.transport.write(data)

    def flush(self) -> None:
        """Write a head still held."""
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    @staticmethod
    def flush_all(pending: list[HeadHolder]) -> None:
        """The turn in which `pending`'s heads were held is over: write those still held."""
        for holder in pending:
            if holder.held is not None:  # the usual: its body took it
                holder.flush()
        pending.clear()

    def close(self) -> None:
        """Close the connection after what is held."""
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        """Whether the connection is closing."""
        return self.transport.is_closing()


class MessageEvent:
    """What uvicorn's cycle and protocol use of asyncio.Event (`set`, `wait`, `clear`), lighter:
    no Python call to create one, and where the edge itself sets or reads it, the flag is read
    directly (a request that arrived whole is set and cleared without a call)."""

    # Class defaults instead of __init__: creating one runs no Python code.
    flag = False
    waiters: list[asyncio.Future[None]] | None = None

    def set(self) -> None:
        """Set the flag and wake whoever waits for it."""
        self.flag = True
        waiters = self.waiters
        if waiters:
            self.waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> None:
        """Until the flag is set."""
        if not self.flag:
            waiter = asyncio.get_running_loop().create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(waiter)
            await waiter

    def clear(self) -> None:
        """Unset the flag."""
        self.flag = False


class EdgeCycle(RequestResponseCycle):
    """uvicorn's request cycle with a leaner `send` (uvicorn's, but for two changes): the answer's
    head is held by the connection's HeadHolder and leaves with the first piece of the body, and
    the header names and values are checked by one pass each rather than two searches per header."""

    holder: HeadHolder
    message_event: MessageEvent  # type: ignore[assignment]
    # A forwarded request waiting for its body, to go to the forwarder's `start` (ForwardCycle).
    deferred = False

    async def receive(self) -> ASGIReceiveEvent:
        """uvicorn's, without a call when the request's body is at hand already."""
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(CONTINUE)
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.flow.resume_reading()
            event = self.message_event
            if not event.flag:
                await event.wait()
            event.flag = False
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body, self.body = self.body, bytearray()
        return {"type": "http.request", "body": bytes(body), "more_body": self.more_body}

    async def send(self, message: ASGISendEvent) -> None:
        """Send one ASGI message of the answer."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected 'http.response.start', got '{message['type']}'.")
            self.holder.hold(self._head(message["status"], message.get("headers", [])))
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected 'http.response.body', got '{message['type']}'.")
            self._write_body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"Unexpected ASGI message '{message['type']}' after the answer.")

    def _head(self, status_code: int, answer_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The answer's status line and headers, noting its framing."""
        self.response_started = True
        self.waiting_for_100_continue = False
        headers = [*self.default_headers, *answer_headers]
        if self.access_log:
            self._log_access(status_code)
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
                if b"close" in connection:
                    self.keep_alive = False
                    has_connection_close = True
            content.extend((name, b": ", value, b"\r\n"))
        # Names are content[1], [5], ...; values content[3], [7], ... `0 in` (the byte NUL): a
        # bytes needle would first be tried as an int, at the cost of raising a TypeError.
        if 0 in b"".join(content[1::4]).translate(_NAME_CHECK):
            raise RuntimeError("Invalid HTTP header name.")
        if 0 in b"".join(content[3::4]).translate(_VALUE_CHECK):
            raise RuntimeError("Invalid HTTP header value.")
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)

    def _log_access(self, status_code: int) -> None:
        self.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(self.scope),
            self.scope["method"],
            get_path_with_query_string(self.scope),
            self.scope["http_version"],
            status_code,
        )

    def _write_body(self, body: bytes, more_body: bool) -> None:
        """Write a piece of the answer's body (after the head, if it is still held)."""
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            body = b""
        elif self.chunked_encoding:
            chunk = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
            if not more_body:
                chunk.append(b"0\r\n\r\n")
            body = b"".join(chunk)
        elif len(body) > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        else:
            self.expected_content_length -= len(body)
        holder = self.holder
        held = holder.held
        if held is not None:
            holder.held = None
            body = held + body
        if body:
            holder.transport.write(body)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            event = self.message_event
            event.flag = True
            if event.waiters:  # a receive() waiting for the client to go
                event.set()
            if not self.keep_alive:
                holder.close()
            self.on_response()


class Forwarder(Protocol):
    """Where the Edge sends requests instead of the ASGI application (the router's proxy)."""

    def start(self, cycle: ForwardCycle) -> bool:
        """Handle a request that arrived whole, without a task if it can (False: it cannot, and
        the request goes to `__call__` in a task)."""

    def __call__(self, cycle: ForwardCycle) -> Awaitable[None]:
        """Handle a request (in a task, from its head on)."""


# The scope state of every forwarded request: empty (a forwarder asks for no back-off).
_FORWARD_STATE: dict[str, Any] = {}


def _nothing() -> None:
    pass


async def _raise(exc: BaseException) -> None:
    raise exc


class ForwardCycle(EdgeCycle):
    """A request for the Edge's forwarder (the router's proxy) instead of the ASGI application.

    The forwarder gets the cycle itself: no ASGI scope of uvicorn's, no `run_asgi` -> application
    -> proxy chain of calls, and a whole answer goes out by one `answer_now` (or `answer`) call;
    `receive` and `send` remain for bodies that stream. A request whose sized body is small
    (or absent) is handed to the forwarder's `start` once it arrived whole, which needs no task
    when the forwarder can answer from a callback (`answer_now`, `spawn` for what must wait,
    `fail`); any other goes to the forwarder in a task from its head on, like an ASGI request.
    `scope` holds only what the forwarder and the answer's framing read: method, path, raw_path,
    query_string, client, headers, http_version (and root_path, state, empty). The connection's
    rules are EdgeCycle's: the same framing, keep-alive, pipelining, limits, timeouts and drain.
    """

    # uvicorn's per-request state as class defaults: creating a cycle sets only the rest.
    disconnected = False
    # What the forwarder's `start` decided before it handed the request on to `__call__`.
    routed: Any = None
    response_started = False
    response_complete = False
    chunked_encoding = None
    expected_content_length = 0
    more_body = True
    logger = logger

    def __init__(
        self, scope: HTTPScope, protocol: EdgeProtocol, forward: Forwarder, keep_alive: bool
    ) -> None:
        self.scope = scope
        self.protocol = protocol
        self.forward = forward
        self.transport = self.holder = protocol._writer  # type: ignore[assignment]
        self.flow = protocol.flow
        self.access_logger = protocol.access_logger
        self.access_log = protocol.access_log
        self.default_headers = protocol.server_state.default_headers
        self.message_event = MessageEvent()
        self.on_response = protocol.on_response_complete
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = protocol.expect_100_continue
        self.body = bytearray()

    def answer_now(
        self, status_code: int, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> bool:
        """The whole answer, its head and body in one write (none once the client is gone),
        unless the client is not reading what it was sent already (False: nothing was written;
        `answer` waits for it)."""
        if self.disconnected:
            return True
        if self.flow.write_paused:
            return False
        self.holder.held = self._head(status_code, headers)
        self._write_body(body, False)
        return True

    def answer_passed(self, status_code: int, header_block: bytes, body: bytes) -> bool:
        """`answer_now` with header lines ready to send (each ending in CRLF; they must give
        the body's length and a Date): a variant's, which its server's parser has checked."""
        if self.disconnected:
            return True
        if self.flow.write_paused:
            return False
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.access_log:
            self._log_access(status_code)
        close = b"" if self.keep_alive else b"connection: close\r\n"
        self.holder.held = STATUS_LINE[status_code] + header_block + close + b"\r\n"
        self.chunked_encoding = False
        self.expected_content_length = len(body)
        self._write_body(body, False)
        return True

    async def answer(
        self, status_code: int, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """The whole answer, its head and body in one write."""
        while not self.answer_now(status_code, headers, body):
            await self.flow.drain()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Go on with the request in a task (one the server waits for at shutdown)."""
        protocol = self.protocol
        task = protocol.loop.create_task(self.run(work))
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)

    def fail(self, exc: BaseException) -> None:
        """The forwarder failed outside a task: the request ends as a failed task's does (`run`
        handles the failure, in a task)."""
        self.spawn(_raise(exc))

    async def run_asgi(self, app: ASGI3Application) -> None:
        """uvicorn's name, so that the protocol starts (and pipelines) both kinds alike; `app`
        is not called: the forwarder is."""
        await self.run(self.forward(self))

    async def run(self, work: Awaitable[None]) -> None:
        """Run the forwarder's `work` for this request; failures end as in uvicorn's run_asgi."""
        try:
            await work
        except BaseException as exc:
            self.logger.error("Exception while forwarding a request\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                self.logger.error("The forwarder returned without starting an answer.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                # A streamed answer that broke off: the client sees it cut, not short and valid.
                self.transport.close()
        finally:
            self.on_response = _nothing


class EdgeProtocol(HttpToolsProtocol):
    """One connection; the Edge it is given holds the settings and the shared counters.

    The parser callbacks replace uvicorn's rather than extend them (each keeps uvicorn's few
    lines): a request costs as many Python calls as it does in uvicorn itself. uvicorn's timer per
    answer for the keep-alive timeout is replaced by the Edge's sweep, as is the read timeout.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        edge: Edge,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._edge = edge
        self._in_head = True
        # Bytes of the current request fed to the parser, and of its body alone.
        self._request_bytes = 0
        self._body_bytes = 0
        # The current request's Content-Length as sent, and whether its body is chunked.
        self._content_length: bytes | None = None
        self._chunked = False
        # loop.time() when the current request (or, before the first, the connection) began:
        # it must have arrived read_timeout_s later. None while no request is arriving.
        self._reading_since: float | None = None
        # loop.time() when the connection's last answer completed, while it waits for the next.
        self._idle_since: float | None = None
        self._refused = False
        self._discarded = 0
        # Body bytes charged to the process budget, per request, until its answer is complete.
        self._charges: list[tuple[RequestResponseCycle, int]] = []

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse past max_connections; otherwise the first request must arrive in time."""
        super().connection_made(transport)
        self._writer = HeadHolder(transport, self.loop, self._edge.held_heads)
        if len(self.connections) > self._edge.settings.max_connections:
            limit = self._edge.settings.max_connections
            self._refuse(503, f"over the limit of {limit} connections; retry later", True)
            return
        self._reading_since = self.loop.time()
        self._edge.watch(self.loop, self.connections)

    def connection_lost(self, exc: Exception | None) -> None:
        """Release whatever this connection still holds."""
        self._reading_since = self._idle_since = None
        self._release(everything=True)
        super().connection_lost(exc)
        self._start_abandoned()

    def _start_abandoned(self) -> None:
        """A forwarded request whose body never arrived whole goes to the forwarder all the
        same (in a task, as any request does that is not deferred): it sees the client go."""
        cycle: EdgeCycle | None = self.cycle  # type: ignore[assignment]
        if cycle is not None and cycle.deferred:
            cycle.deferred = False
            self._start_asgi_task(cycle, self.app)

    def check_timeouts(self, now: float) -> None:
        """The Edge's sweep: a request that took too long is refused, an idle connection closed."""
        settings = self._edge.settings
        since = self._reading_since
        if since is not None and now - since >= settings.read_timeout_s:
            self._read_timed_out()
        since = self._idle_since
        if since is not None and now - since >= settings.keepalive_timeout_s:
            self._idle_since = None
            if not self.transport.is_closing():
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, never more than max_header_bytes of a request's head at a time."""
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_READ_BYTES:
                self.transport.pause_reading()
            return
        self._idle_since = None
        if self._reading_since is None and self._in_head:
            self._reading_since = self.loop.time()
        limit = self._edge.settings.max_header_bytes
        try:
            while data and not self._refused:
                if self._in_head:
                    room = limit - self._request_bytes + 1
                    piece, data = data[:room], data[room:]
                else:
                    piece, data = data, b""
                self._request_bytes += len(piece)
                self.parser.feed_data(piece)
                if self._refused:
                    return
                if self._in_head and self._request_bytes > limit:
                    self._refuse(431, f"request line and headers are over {limit} bytes")
                elif self._request_bytes - self._body_bytes > 2 * limit:
                    self._refuse(431, f"chunk framing and trailers are over {2 * limit} bytes")
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """uvicorn's, but the scope is built once the target is known (on_headers_complete)."""
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        """uvicorn's, for the head only (chunked trailers never become headers), noting the
        body's framing."""
        if self._in_head:
            name = name.lower()
            if name == b"content-length":
                self._content_length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """Check the target and the body's size before the application sees the request."""
        self._in_head = False
        if self._refused:
            return
        if self.url == b"*":
            if self.parser.get_method() == b"OPTIONS":
                self._answer_options()
            else:
                self._refuse(400, "the request target * is only valid for OPTIONS")
            return
        declared = self._content_length
        self._content_length = None
        # httptools has checked the number; it is charged unless it is over the whole budget (the
        # application's own size limit refuses it before reading: the server's 413; `serve`
        # keeps its limit within the budget).
        size = small = int(declared) if declared else 0
        edge = self._edge
        budget = edge.settings.max_body_bytes_in_flight
        if size > budget:
            size = 0
        elif edge.body_bytes_in_flight + size > budget:
            self._refuse_over_budget()
            return
        # uvicorn's, without websockets or its concurrency limit (this server uses neither).
        parser = self.parser
        http_version = parser.get_http_version()
        method = parser.get_method().decode("ascii")
        try:
            url = httptools.parse_url(self.url)
            raw_path = url.path
            path = raw_path.decode("ascii")
        except (httptools.HttpParserError, ValueError, AttributeError):
            # httptools.parse_url refused the target, or it has no path, or it is not ASCII.
            self._refuse(400, f"malformed request target {self.url[:100]!r}")
            return
        if "%" in path:
            path = urllib.parse.unquote(path)
        keep_alive = http_version != "1.0" and parser.should_keep_alive() and not edge.draining
        running = self.cycle
        forward = edge.forward
        cycle: EdgeCycle
        defer = False
        if forward is not None and path not in edge.local_paths:
            scope: HTTPScope = {  # type: ignore[typeddict-item]
                "method": method,
                "http_version": http_version,
                "path": path,
                "raw_path": raw_path,
                "query_string": url.query or b"",
                "root_path": "",
                "client": self.client,
                "headers": self.headers,
                "state": _FORWARD_STATE,
            }
            cycle = self.cycle = ForwardCycle(scope, self, forward, keep_alive)
            # A small sized body (or none) is awaited here, then the request goes to `start`
            # (on_message_complete); on_body never pauses reading for one (HIGH_WATER_LIMIT).
            defer = not (self._chunked or self.expect_100_continue or small > HIGH_WATER_LIMIT)
        else:
            # uvicorn's scope (its on_message_begin's).
            scope = self.scope = {
                "type": "http",
                "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                "http_version": http_version,
                "server": self.server,
                "client": self.client,
                "scheme": self.scheme,  # type: ignore[typeddict-item]
                "method": method,
                "root_path": self.root_path,
                "path": self.root_path + path,
                "raw_path": self.root_path.encode("ascii") + raw_path,
                "query_string": url.query or b"",
                "headers": self.headers,
                "state": self.app_state.copy(),
            }
            cycle = self.cycle = EdgeCycle(
                scope=scope,
                transport=self._writer,  # type: ignore[arg-type]
                flow=self.flow,
                logger=self.logger,
                access_logger=self.access_logger,
                access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=MessageEvent(),  # type: ignore[arg-type]
                expect_100_continue=self.expect_100_continue,
                keep_alive=keep_alive,
                on_response=self.on_response_complete,
            )
            cycle.holder = self._writer
        if size:
            edge.body_bytes_in_flight += size
            self._charges.append((cycle, size))
        if running is None or running.response_complete:
            if defer:
                cycle.deferred = True
            else:
                self._start_asgi_task(cycle, self.app)
        else:  # pipelined: after the running one
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))

    def on_body(self, body: bytes) -> None:
        """uvicorn's; chunked bodies are charged to the budget as they arrive."""
        if self._refused:
            return
        self._body_bytes += len(body)
        cycle = self.cycle
        if cycle.response_complete:
            return
        if self._chunked:
            edge = self._edge
            if edge.body_bytes_in_flight + len(body) > edge.settings.max_body_bytes_in_flight:
                self._refuse_over_budget()
                return
            edge.body_bytes_in_flight += len(body)
            self._charges.append((cycle, len(body)))
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        event: MessageEvent = cycle.message_event  # type: ignore[assignment]
        event.flag = True
        if event.waiters:  # usually the request's task has not asked yet
            event.set()

    def on_message_complete(self) -> None:
        """uvicorn's; the whole request arrived in time; the next byte starts the next head."""
        self._reading_since = None
        self._in_head = True
        self._chunked = False
        self._request_bytes = self._body_bytes = 0
        cycle: EdgeCycle = self.cycle  # type: ignore[assignment]
        if self._refused or cycle.response_complete:
            return
        cycle.more_body = False
        event: MessageEvent = cycle.message_event
        event.flag = True
        if event.waiters:
            event.set()
        if cycle.deferred:
            cycle.deferred = False
            forward = self._edge.forward
            assert forward is not None
            if not forward.start(cycle):  # type: ignore[arg-type]
                self._start_asgi_task(cycle, self.app)

    def on_response_complete(self) -> None:
        """An answer went out: give its body bytes back to the budget, back off if asked; then
        uvicorn's: the next pipelined request starts, or the connection is idle."""
        charges = self._charges
        if len(charges) == 1 and charges[0][0].response_complete:  # the usual: the one answered
            self._edge.body_bytes_in_flight -= charges[0][1]
            charges.clear()
        elif charges:
            self._release(everything=False)
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()
        backoff_s = self.cycle.scope["state"].get(BACKOFF_STATE_KEY)
        if backoff_s:
            self.flow.pause_reading()
            self.loop.call_later(backoff_s, self._end_backoff)

    def _end_backoff(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    # -- helpers ---------------------------------------------------------------------------------

    def _refuse_over_budget(self) -> None:
        self._refuse(503, "too many request bytes in flight; retry later", retry_after=True)

    def _release(self, *, everything: bool) -> None:
        """Give back the body bytes of the answered requests (of all, when the connection goes)."""
        kept = []
        for cycle, size in self._charges:
            if everything or cycle.response_complete:
                self._edge.body_bytes_in_flight -= size
            else:
                kept.append((cycle, size))
        self._charges = kept

    def _answer_options(self) -> None:
        answer = b"HTTP/1.1 200 OK\r\nallow: %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        self._close_after(answer % ALLOWED_METHODS)

    def _refuse(self, status: int, message: str, retry_after: bool = False) -> None:
        """Answer `status` in JSON unless an answer has started, then close the connection."""
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("%s: refused with %d: %s", self.client, status, message)
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self._close_after(b"")  # mid-answer: nothing more can be said
        else:
            self._close_after(render_refusal(status, message, retry_after=retry_after))
        if cycle is not None and not cycle.response_complete:
            # The application, if it is still reading, sees the client go.
            cycle.disconnected = True
            cycle.message_event.set()
            self._start_abandoned()

    def _close_after(self, answer: bytes) -> None:
        self._refused = True
        self._reading_since = self._idle_since = None
        self.connections.discard(self)
        transport = self.transport
        if transport.is_closing():
            return
        self._writer.flush()
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)

    def _read_timed_out(self) -> None:
        self._reading_since = None
        if self._request_bytes == 0 and self._in_head:
            # Nothing of a request arrived: an idle connection, closed without a word.
            self._close_after(b"")
            return
        timeout = self._edge.settings.read_timeout_s
        self._refuse(408, f"the request did not arrive within {timeout:g} s")

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, except that a connection between requests is closed
        only if no request reaches it within the settings' `shutdown_grace_s`: one already sent
        (in the socket's buffer, not read yet) is answered, with `Connection: close`, instead of
        lost. A refused connection is closing already."""
        if self._refused:
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            grace_s = self._edge.settings.shutdown_grace_s
            self.loop.call_later(grace_s, self._close_unless_answering, cycle)
            return
        super().shutdown()

    def _close_unless_answering(self, idle_cycle: RequestResponseCycle | None) -> None:
        if self.cycle is idle_cycle and self._request_bytes == 0:
            self.transport.close()
        else:
            super().shutdown()
