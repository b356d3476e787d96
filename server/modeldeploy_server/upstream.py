"""A small pooled HTTP/1.1 client for the router's calls to its variants.

The response framing is httptools' (llhttp, the parser uvicorn itself uses): this module only
writes requests, keeps idle connections per variant and hands the parser's events to the proxy.
It exists because the general-purpose client it replaces (aiohttp) spent about three quarters of
the router's CPU per request; a proxy needs none of its cookies, redirects, encodings or URL
handling. What it guarantees the proxy:

- A failure says whether any byte of the answer had arrived (`UpstreamError.replayable`): only a
  request that the variant refused, or whose connection was reset before it answered anything,
  may be sent again elsewhere.
- A connection goes back to the pool only after a complete answer that allows keep-alive, to a
  request that was sent whole; anything else (errors, early answers, HEAD) closes it, so a reused
  connection never starts in the middle of an old message.

The answer's header lines are kept as the bytes the variant sent (the parser has checked them)
rather than parsed one callback per header: the proxy passes them on as they are when none of
them needs changing, which is the usual answer of a modeldeploy server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

# Idle connections are dropped before the variant's uvicorn drops them (its keep-alive is 5 s), so
# that a request is rarely written to a connection the server is closing.
IDLE_TIMEOUT_S = 4.0
MAX_IDLE_PER_VARIANT = 256
# Answers up to this size are handed over whole (one write to the client, with its length);
# larger ones stream, and reading from the variant pauses while this much waits unsent.
BUFFER_LIMIT_BYTES = 1 << 20
SWEEPS_PER_TIMEOUT = 4

Reason = Literal["unreachable", "reset", "timeout", "broken"]


class UpstreamError(Exception):
    """A variant did not answer. `replayable`: nothing of an answer arrived and the request may
    be sent to another variant; `reason` is a metric label."""

    def __init__(self, reason: Reason, detail: str, *, replayable: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.replayable = replayable


class BodySourceError(Exception):
    """Reading the request body (from the client) failed; the cause says why."""


class Connection(asyncio.Protocol):
    """One keep-alive connection to a variant, carrying one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._drain: asyncio.Future[None] | None = None
        # `start`'s callback, while it waits (its deadline is in the pool's AnswerDeadlines).
        self._done: Callable[[Connection], None] | None = None
        # What arrived of the answer until its head was complete (the head is cut out of it).
        self._head_parts: list[bytes] = []
        self._begin(head_only=False)
        self._active = False

    def _begin(self, head_only: bool) -> None:
        self._active = True
        self._waiter: asyncio.Future[None] | None = None
        self._head_only = head_only
        self._received = False
        self._sent_whole = False
        self.status = 0
        self.header_block = b""
        self._head_parts.clear()
        self._body: list[bytes] = []
        self._buffered = 0
        self.head_done = False
        self.complete = False
        self._streaming = False
        self._keep_alive = False
        self._stray = False
        self.error: UpstreamError | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            # Bytes on an idle connection belong to no request: the connection cannot be trusted.
            self.close()
            return
        self._received = True
        if not self.head_done:
            self._head_parts.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("broken", f"malformed answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.complete:
            return
        if self.head_done and not _is_framed(self.header_block):
            # An answer without Content-Length or chunking ends where the connection does.
            self._finish()
            return
        if self._received:
            self._fail(UpstreamError("broken", "connection closed in the middle of the answer"))
        else:
            self._fail(
                UpstreamError(
                    "reset", f"connection closed before any answer: {exc or 'EOF'}", replayable=True
                )
            )

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request: the connection's framing cannot be trusted.
            self._keep_alive = False
            self._stray = True

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        parts = self._head_parts
        received = parts[0] if len(parts) == 1 else b"".join(parts)
        # The parser has checked the head, so it ends at the first blank line; the lines between
        # the status line and that blank line are the headers.
        start = received.find(b"\r\n") + 2
        end = received.find(b"\r\n\r\n", start - 2) + 2
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): not passed on; the final one
            # follows on the same connection.
            parts[:] = [received[end + 2 :]]
            return
        parts.clear()
        self.header_block = received[start:end]
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        self.head_done = True
        if self._head_only:
            # The parser cannot be told that a HEAD answer has no body: the connection is not
            # reused, so whatever it holds is never read as the next answer.
            self._keep_alive = False
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_LIMIT_BYTES:
            if self._transport is not None:
                self._transport.pause_reading()
            if not self._streaming:
                self._streaming = True
        if self._streaming:
            self._wake()

    def on_message_complete(self) -> None:
        if not self.complete and not self._stray and self.head_done:
            self.complete = True
            self._wake()

    # the exchange

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        done = self._done
        if done is not None:
            self._done = None
            del self._pool.deadlines.waiting[self]
            done(self)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Close the connection; an exchange in progress fails."""
        if self._transport is not None and not self.closed:
            self._transport.close()
            self.closed = True
            self._pool.forget(self)

    def expire(self, what: str) -> None:
        """Fail the exchange for a timeout, and drop the connection."""
        self._fail(UpstreamError("timeout", f"no {what} in time"))
        if self._transport is not None:
            self._transport.abort()

    async def _wait(self, timeout_s: float, what: str) -> None:
        """Until the parser or the connection has news, or `timeout_s` without any."""
        self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout_s, self.expire, what)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes],
        *,
        head_only: bool,
        chunked: bool,
        timeout_s: float,
    ) -> Answer:
        """Send one request and wait for the head of its answer (the whole answer if small)."""
        assert self._transport is not None
        self._begin(head_only)
        if isinstance(body, bytes):
            self._transport.write(head + body if body else head)
            self._sent_whole = True
        else:
            self._transport.write(head)
            await self._send_streamed(body, chunked, timeout_s)
        while not (self.complete or self.error or self._streaming):
            await self._wait(timeout_s, "answer")
        return self.result()

    def start(
        self,
        request: bytes,
        *,
        head_only: bool,
        timeout_s: float,
        done: Callable[[Connection], None],
    ) -> None:
        """Send a request with its whole body (`request`: line, headers, body) and call
        `done(self)` once the answer is complete, starts to stream or fails (then `result`)."""
        assert self._transport is not None
        self._begin(head_only)
        self._done = done
        self._pool.deadlines.watch(self, timeout_s)
        self._transport.write(request)
        self._sent_whole = True

    def result(self) -> Answer:
        """The answer the exchange got (the whole of it if small); raises its failure."""
        if self.error is not None:
            self.close()
            raise self.error
        answer = Answer(self)
        if self.complete:
            answer.body = self._take_body()
            self.release()
        return answer

    async def _send_streamed(
        self, body: AsyncIterator[bytes], chunked: bool, timeout_s: float
    ) -> None:
        # A task, so that an answer arriving before the upload ends (a 413 on the declared
        # length) is not held up by a slow client; the upload then stops.
        sender = self._loop.create_task(self._write_body(body, chunked, timeout_s))
        self._waiter = self._loop.create_future()
        try:
            await asyncio.wait((sender, self._waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiter = None
        if not sender.done():
            sender.cancel()
            self._keep_alive = False
            return
        exc = sender.exception()
        if isinstance(exc, UpstreamError):
            raise exc
        if exc is not None:
            self.close()
            raise BodySourceError from exc
        self._sent_whole = True

    async def _drain_in_time(self, timeout_s: float) -> None:
        assert self._drain is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._drain), timeout_s)
        except TimeoutError:
            self.expire("progress sending the request")
            raise self.error or UpstreamError("timeout", "no progress") from None

    async def _write_body(
        self, body: AsyncIterator[bytes], chunked: bool, timeout_s: float
    ) -> None:
        assert self._transport is not None
        async for chunk in body:
            if self.closed:
                break
            if chunked:
                if chunk:
                    self._transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                self._transport.write(chunk)
            if self._drain is not None:
                await self._drain_in_time(timeout_s)
        if chunked and not self.closed:
            # The last chunk; the client's trailers, if any, are not passed on.
            self._transport.write(b"0\r\n\r\n")

    def _take_body(self) -> bytes:
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body.clear()
        self._buffered = 0
        return body

    async def chunks(self, timeout_s: float) -> AsyncIterator[bytes]:
        """The rest of a streamed answer; raises UpstreamError if it breaks off."""
        while True:
            if self._body:
                yield self._take_body()
                if self._transport is not None and not self.closed:
                    self._transport.resume_reading()
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait(timeout_s, "data")

    def hold_reading(self, hold: bool) -> None:
        """Leave what the variant sends in the kernel's buffer for now (`hold`), or read on."""
        if self._transport is not None and not self.closed:
            if hold:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def release(self) -> None:
        """Return the connection to the pool if it can carry another exchange, else close it."""
        self._active = False
        reusable = self._keep_alive and self._sent_whole and not self._stray
        if self.complete and reusable and not self.closed:
            self.idle_since = self._loop.time()
            idle = self._pool.idle
            if len(idle) < MAX_IDLE_PER_VARIANT:
                idle.append(self)
                return
        self.close()


class Answer:
    """The head of a variant's answer, and its whole body when it was small (else None).

    `header_block`: the header lines as the variant sent them, each ending in CRLF."""

    __slots__ = ("body", "connection", "header_block", "status")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.status = connection.status
        self.header_block = connection.header_block
        self.body: bytes | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The headers as (lower-case name, value) pairs, in the order sent."""
        return parse_header_block(self.header_block)


def parse_header_block(block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value) pairs of header lines the parser has accepted."""
    headers = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        headers.append((name.lower(), value.strip(b" \t")))
    return headers


def _is_framed(block: bytes) -> bool:
    """Whether header lines give the body's length or chunking (else it ends when the connection
    does)."""
    lowered = b"\r\n" + block.lower()
    return lowered.find(b"\r\ncontent-length:") >= 0 or lowered.find(b"\r\ntransfer-encoding:") >= 0


class AnswerDeadlines:
    """When the answers to `Connection.start`'s requests are due, checked by one sweep every
    quarter of the shortest timeout asked for rather than by a timer per request (which cost
    about 4% of the router's instructions per request): a request times out between its
    timeout and a quarter of it later."""

    def __init__(self) -> None:
        self.waiting: dict[Connection, float] = {}
        self._loop = asyncio.get_running_loop()
        self._interval_s = math.inf
        self._sweep: asyncio.TimerHandle | None = None

    def watch(self, connection: Connection, timeout_s: float) -> None:
        """Expire `connection`'s exchange in `timeout_s` unless its callback ran before."""
        self.waiting[connection] = self._loop.time() + timeout_s
        if timeout_s < self._interval_s * SWEEPS_PER_TIMEOUT:
            self._interval_s = timeout_s / SWEEPS_PER_TIMEOUT
            self.close()
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._interval_s, self._sweep_once)

    def _sweep_once(self) -> None:
        self._sweep = None
        now = self._loop.time()
        for connection in [c for c, due in self.waiting.items() if due <= now]:
            connection.expire("answer")  # its callback runs, which forgets it
        if self.waiting:
            self._sweep = self._loop.call_later(self._interval_s, self._sweep_once)

    def close(self) -> None:
        """Stop the sweep (until the next `watch`)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


class Pool:
    """Idle connections to one variant (scheme, host, port), most recently used first."""

    def __init__(self, url: str, connect_timeout_s: float, deadlines: AnswerDeadlines) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._literal_address = _is_address(self.host)
        # Host header and the path prefix every target starts with.
        self.host_header = parts.netloc.encode("latin-1")
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self._connect_timeout_s = connect_timeout_s
        self.deadlines = deadlines
        # Connections kept for the next requests (Connection.release puts them back).
        self.idle: list[Connection] = []
        self._loop = asyncio.get_running_loop()

    def request_line(self, method: bytes, target: bytes) -> bytes:
        """The request line and Host header of a request to this variant."""
        return b"%s %s%s HTTP/1.1\r\nhost: %s\r\n" % (method, self.prefix, target, self.host_header)

    async def acquire(self) -> Connection:
        """An idle connection that is still fresh, or a new one."""
        return self.take_idle() or await self.connect()

    def take_idle(self) -> Connection | None:
        """An idle connection that is still fresh, if there is one."""
        if self.idle:
            now = self._loop.time()
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed and now - connection.idle_since < IDLE_TIMEOUT_S:
                    connection.reused = True
                    return connection
                connection.close()
        return None

    async def connect(self) -> Connection:
        """A new connection, to one of the host's addresses picked at random.

        In router mode a variant's Service is headless: its name resolves to the addresses of
        the variant's ready pods. Picking one per connection spreads the pooled connections over
        the pods as kube-proxy does for a ClusterIP (resolvers return the addresses in one order),
        and an address that refuses (a pod just gone) is followed by the next one.
        """
        failure: OSError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                for address in await self._addresses():
                    try:
                        _, protocol = await self._loop.create_connection(
                            lambda: Connection(self),
                            address,
                            self.port,
                            ssl=self.ssl,
                            server_hostname=self.host if self.ssl else None,
                        )
                    except OSError as exc:
                        failure = exc
                    else:
                        return protocol
        except TimeoutError:
            raise UpstreamError(
                "unreachable", "cannot connect: no connection in time", replayable=True
            ) from None
        except OSError as exc:  # the name did not resolve
            failure = exc
        reason = failure or "the name has no address"
        raise UpstreamError("unreachable", f"cannot connect: {reason}", replayable=True)

    async def _addresses(self) -> list[str]:
        """The host's addresses in random order (an address as given is its own)."""
        if self._literal_address:
            return [self.host]
        found = await self._loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in found))
        random.shuffle(addresses)
        return addresses

    def forget(self, connection: Connection) -> None:
        """Drop a closed connection from the idle list."""
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection."""
        for connection in list(self.idle):
            connection.close()
        self.idle.clear()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Upstream:
    """The pools of every variant URL seen, created on first use and closed together."""

    def __init__(self, connect_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._pools: dict[str, Pool] = {}
        self._deadlines: AnswerDeadlines | None = None

    def pool(self, url: str) -> Pool:
        """The pool for a variant's base URL (call inside the running loop)."""
        pool = self._pools.get(url)
        if pool is None:
            if self._deadlines is None:
                self._deadlines = AnswerDeadlines()
            pool = self._pools[url] = Pool(url, self._connect_timeout_s, self._deadlines)
        return pool

    def close(self) -> None:
        """Close every idle connection of every pool."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._deadlines is not None:
            self._deadlines.close()
