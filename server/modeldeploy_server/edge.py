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
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
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
# What uvicorn writes, whole, when a request expects it; it precedes the answer's head.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class Edge:
    """Process-wide state the protocol instances share (one per uvicorn server)."""

    settings: EdgeSettings
    body_bytes_in_flight: int = 0
    # Set at SIGTERM: every answer from now on closes its connection.
    draining: bool = False


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
    """The connection's transport as uvicorn's request cycles see it: the head of each answer is
    held back until the first piece of its body, so that a small answer leaves in one write.

    uvicorn writes the status line and headers, then the body, in two calls; on a TCP_NODELAY
    socket that is two syscalls, two segments and two wake-ups of the client per answer. A head
    never waits longer than the current turn of the event loop (an answer whose body comes later,
    a HEAD answer): it is written then, or before anything else the connection writes or closes.
    """

    __slots__ = ("_expect_head", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._expect_head = True

    def write(self, data: bytes) -> None:
        """The first write of an answer is its head: hold it; join it to the next write."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif self._expect_head and data != CONTINUE:
            self._expect_head = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write a head still held."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def next_answer(self) -> None:
        """An answer is complete: write what it left held; the next write is the next head."""
        self.flush()
        self._expect_head = True

    def close(self) -> None:
        """Close the connection after what is held."""
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        """Whether the connection is closing."""
        return self._transport.is_closing()


class EdgeProtocol(HttpToolsProtocol):
    """One connection; the Edge it is given holds the settings and the shared counters."""

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
        self._chunked = False
        self._read_timer: TimerHandle | None = None
        self._refused = False
        self._discarded = 0
        # Body bytes charged to the process budget, per request, until its answer is complete.
        self._charges: list[tuple[RequestResponseCycle, int]] = []

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse past max_connections; otherwise the first request must arrive in time."""
        super().connection_made(transport)
        self._writer = HeadHolder(transport, self.loop)
        if len(self.connections) > self._edge.settings.max_connections:
            limit = self._edge.settings.max_connections
            self._refuse(503, f"over the limit of {limit} connections; retry later", True)
            return
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release whatever this connection still holds."""
        self._cancel_read_timer()
        self._release(everything=True)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser, never more than max_header_bytes of a request's head at a time."""
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_READ_BYTES:
                self.transport.pause_reading()
            return
        self._unset_keepalive_if_required()
        if self._read_timer is None and self._in_head:
            self._arm_read_timer()
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

    def on_header(self, name: bytes, value: bytes) -> None:
        """Headers of the head only: chunked trailers never become headers."""
        if self._in_head:
            super().on_header(name, value)

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
        declared = self._declared_length()
        if declared and declared > self._edge.settings.max_body_bytes_in_flight:
            # More than the whole budget: the application's own size limit refuses it before
            # reading (the server's 413; `serve` keeps its limit within the budget).
            declared = None
        if declared and not self._charge(declared):
            return
        try:
            super().on_headers_complete()
        except (httptools.HttpParserError, ValueError, AttributeError):
            # httptools.parse_url refused the target, or it has no path, or it is not ASCII.
            self._release_charge(declared)
            self._refuse(400, f"malformed request target {self.url[:100]!r}")
            return
        # uvicorn's cycle writes through the head holder (the cycle is not running yet).
        self.cycle.transport = cast(asyncio.Transport, self._writer)
        if self._edge.draining:
            self.cycle.keep_alive = False
        if declared:
            self._charges.append((self.cycle, declared))

    def on_body(self, body: bytes) -> None:
        """Chunked bodies are charged to the budget as they arrive."""
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._chunked and not self.cycle.response_complete:
            if not self._charge(len(body)):
                return
            self._charges.append((self.cycle, len(body)))
        super().on_body(body)

    def on_message_complete(self) -> None:
        """The whole request arrived: stop its read timer, start counting the next head."""
        self._cancel_read_timer()
        self._in_head = True
        self._request_bytes = self._body_bytes = 0
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        """An answer went out: give its body bytes back to the budget, back off if asked."""
        self._writer.next_answer()
        self._release(everything=False)
        super().on_response_complete()
        backoff_s = self.cycle.scope["state"].get(BACKOFF_STATE_KEY)
        if backoff_s and not self.transport.is_closing():
            self.flow.pause_reading()
            self.loop.call_later(backoff_s, self._end_backoff)

    def _end_backoff(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()

    # -- helpers ---------------------------------------------------------------------------------

    def _declared_length(self) -> int | None:
        """Content-Length as a number (httptools has checked it), noting a chunked body."""
        self._chunked = False
        declared = None
        for name, value in self.headers:
            if name == b"content-length" and value.strip().isdigit():
                declared = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
        return declared

    def _charge(self, size: int) -> bool:
        """Take `size` body bytes from the process budget, or refuse this request."""
        edge = self._edge
        if edge.body_bytes_in_flight + size > edge.settings.max_body_bytes_in_flight:
            message = "too many request bytes in flight; retry later"
            self._refuse(503, message, retry_after=True)
            return False
        edge.body_bytes_in_flight += size
        return True

    def _release_charge(self, size: int | None) -> None:
        self._edge.body_bytes_in_flight -= size or 0

    def _release(self, *, everything: bool) -> None:
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

    def _close_after(self, answer: bytes) -> None:
        self._refused = True
        self._cancel_read_timer()
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        transport = self.transport
        if transport.is_closing():
            return
        self._writer.flush()
        transport.write(answer)
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.close)

    def _arm_read_timer(self) -> None:
        self._read_timer = self.loop.call_later(
            self._edge.settings.read_timeout_s, self._read_timed_out
        )

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self._request_bytes == 0 and self._in_head:
            # Nothing of a request arrived: an idle connection, closed without a word.
            self._close_after(b"")
            return
        timeout = self._edge.settings.read_timeout_s
        self._refuse(408, f"the request did not arrive within {timeout:g} s")

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown; a refused connection is closing already."""
        if not self._refused:
            super().shutdown()
