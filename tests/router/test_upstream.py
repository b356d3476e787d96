"""The router's HTTP/1.1 client against real servers on loopback that misbehave on purpose.

Each test scripts a TCP server (a thread with a listening socket): what it answers, how it
frames it, when it closes. The client must frame every answer right, never reuse a connection
that could hold the rest of an old message, and say whether a failure is safe to replay.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from modeldeploy_server.upstream import (
    BUFFER_LIMIT_BYTES,
    Answer,
    Connection,
    Upstream,
    UpstreamError,
)
from tests.router.scripted import LOOPBACK, Handler, read_request, scripted_server


def answer(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


@dataclass
class Step:
    """One request of a test: how it is sent, and the pause before it."""

    body: bytes = b""
    head_only: bool = False
    timeout_s: float = 5.0
    pause_s: float = 0.0


@dataclass
class Outcome:
    """What a step got: the answer, its whole body and the connection; or the error."""

    answer: Answer | None = None
    body: bytes = b""
    connection: Connection | None = None
    error: UpstreamError | None = None


async def fetch(upstream: Upstream, url: str, step: Step) -> Outcome:
    """One exchange; the whole body, buffered or streamed."""
    connection = await upstream.pool(url).acquire()
    head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(step.body)
    got = await connection.exchange(
        head, step.body, head_only=step.head_only, chunked=False, timeout_s=step.timeout_s
    )
    if got.body is not None:
        return Outcome(got, got.body, connection)
    pieces = [chunk async for chunk in connection.chunks(5.0)]
    connection.release()
    return Outcome(got, b"".join(pieces), connection)


def run_steps(url: str, *steps: Step) -> list[Outcome]:
    """The steps one after the other through one pool, failures included."""

    async def run() -> list[Outcome]:
        upstream = Upstream(connect_timeout_s=5)
        outcomes = []
        try:
            for step in steps:
                await asyncio.sleep(step.pause_s)
                try:
                    outcomes.append(await fetch(upstream, url, step))
                except UpstreamError as exc:
                    outcomes.append(Outcome(error=exc))
        finally:
            upstream.close()
        return outcomes

    return asyncio.run(run())


def keep_alive_handler(answers: list[bytes], seen: list[bytes]) -> Handler:
    """Answer each request on a connection with the next of `answers`, keeping it open."""

    def handle(conn: socket.socket, _index: int) -> None:
        for reply in answers:
            got = read_request(conn)
            if not got:
                return
            seen.append(got)
            conn.sendall(reply)
        conn.recv(1)  # until the client closes

    return handle


def failure(outcome: Outcome) -> tuple[str, bool]:
    assert outcome.error is not None, outcome
    return outcome.error.reason, outcome.error.replayable


def test_content_length_answers_reuse_one_connection() -> None:
    seen: list[bytes] = []
    replies = [answer(b'{"n": %d}' % i, b"content-type: application/json") for i in range(3)]
    with scripted_server(keep_alive_handler(replies, seen)) as (url, _):
        outcomes = run_steps(url, *[Step(body=b"abc")] * 3)
    assert [o.body for o in outcomes] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert outcomes[0].answer is not None
    assert outcomes[0].answer.headers == [
        (b"content-length", b"8"),
        (b"content-type", b"application/json"),
    ]
    assert len({id(o.connection) for o in outcomes}) == 1
    assert [req.endswith(b"\r\n\r\nabc") for req in seen] == [True, True, True]


def test_chunked_answer_with_extensions_is_reassembled_and_the_connection_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n"
    )
    seen: list[bytes] = []
    with scripted_server(keep_alive_handler([chunked, answer(b"second")], seen)) as (url, _):
        first, second = run_steps(url, Step(), Step())
    assert first.answer is not None
    assert (first.answer.status, first.body, second.body) == (200, b"hello world", b"second")
    assert first.connection is second.connection


def test_answer_ended_by_close_is_complete_and_the_connection_not_reused() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil the end %d" % index)

    with scripted_server(handle) as (url, _):
        first, second = run_steps(url, Step(), Step())
    assert (first.body, second.body) == (b"until the end 0", b"until the end 1")
    assert first.connection is not second.connection


@pytest.mark.parametrize("piece_bytes", [0, 3])
def test_interim_answers_are_skipped_and_the_final_head_is_kept_whole(piece_bytes: int) -> None:
    """100 Continue and 103 Early Hints before the answer: neither is the answer, and none of
    their header lines joins its headers; the bytes arrive in one write (0) or a few at a time."""
    final = answer(b"final", b"content-type: text/plain", b"x-model-version: v1")
    sent = b"HTTP/1.1 100 Continue\r\n\r\n"
    sent += b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n" + final

    step = piece_bytes or len(sent)
    pieces = [sent[start : start + step] for start in range(0, len(sent), step)]

    def handle(conn: socket.socket, _index: int) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(2):
            read_request(conn)
            for piece in pieces:
                conn.sendall(piece)
                time.sleep(0.002)
        conn.recv(1)

    with scripted_server(handle) as (url, _):
        outcomes = run_steps(url, Step(), Step())
    for outcome in outcomes:
        assert outcome.answer is not None
        assert (outcome.answer.status, outcome.body) == (200, b"final")
        assert outcome.answer.headers == [
            (b"content-length", b"5"),
            (b"content-type", b"text/plain"),
            (b"x-model-version", b"v1"),
        ]
    assert outcomes[0].connection is outcomes[1].connection


@pytest.mark.parametrize("pause_s", [0.0, 0.1])
def test_extra_bytes_after_an_answer_are_never_read_as_the_next_answer(pause_s: float) -> None:
    """A server that sends two answers to one request (a pipelining mix-up): the stray one
    arrives with the first (pause 0) or while the connection idles in the pool (pause 0.1 s)."""

    def handle(conn: socket.socket, index: int) -> None:
        read_request(conn)
        if pause_s:
            conn.sendall(answer(b"right %d" % index))
            time.sleep(pause_s / 2)
            conn.sendall(answer(b"stray"))
        else:
            # One write, so the stray answer really comes with the first whatever the load: two
            # writes could be parted by a scheduling gap longer than the client's next request.
            conn.sendall(answer(b"right %d" % index) + answer(b"stray"))
        read_request(conn)
        conn.sendall(answer(b"late"))
        conn.recv(1)

    with scripted_server(handle) as (url, _):
        outcomes = run_steps(url, Step(), Step(pause_s=pause_s))
    assert [o.body for o in outcomes] == [b"right 0", b"right 1"]


def test_reset_before_any_byte_is_replayable_and_a_new_connection_follows() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        read_request(conn)
        if index == 0:
            # Linger 0: close() sends a reset.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            return
        conn.sendall(answer(b"fine"))
        conn.recv(1)

    with scripted_server(handle) as (url, _):
        failed, fine = run_steps(url, Step(), Step())
    assert failure(failed) == ("reset", True)
    assert fine.body == b"fine"


def test_refused_connection_is_unreachable_and_replayable() -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))  # bound, not listening: refused
        (failed,) = run_steps(f"http://{LOOPBACK}:{probe.getsockname()[1]}", Step())
    assert failure(failed) == ("unreachable", True)
    assert "cannot connect" in str(failed.error)


@pytest.mark.parametrize("size", [100, BUFFER_LIMIT_BYTES + 100_000])
def test_close_in_the_middle_of_the_body_is_broken_and_not_replayable(size: int) -> None:
    def handle(conn: socket.socket, _index: int) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * (size // 2))

    with scripted_server(handle) as (url, _):
        (failed,) = run_steps(url, Step())
    assert failure(failed) == ("broken", False)


def test_silent_server_times_out_and_the_pool_recovers() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        read_request(conn)
        if index == 0:
            time.sleep(1.0)  # say nothing
            return
        conn.sendall(answer(b"awake"))
        conn.recv(1)

    with scripted_server(handle) as (url, _):
        failed, awake = run_steps(url, Step(timeout_s=0.2), Step())
    assert failure(failed) == ("timeout", False)
    assert awake.body == b"awake"


def test_requests_sent_with_a_callback_time_out_by_the_shared_sweep() -> None:
    """`Connection.start` on three connections to a server that answers only the one marked
    `fast`: the other two fail for their timeout within a quarter of it; the answered one is
    never expired afterwards."""
    timeout_s = 0.4

    def handle(conn: socket.socket, _index: int) -> None:
        if read_request(conn).endswith(b"fast"):
            conn.sendall(answer(b"done"))
        conn.recv(1)

    async def run(url: str) -> list[tuple[str, float]]:
        upstream = Upstream(connect_timeout_s=5)
        loop = asyncio.get_running_loop()
        outcomes: list[tuple[str, float]] = []
        finished = loop.create_future()
        started = loop.time()

        def done(connection: Connection) -> None:
            try:
                outcome = connection.result().body or b""
                outcomes.append((outcome.decode(), loop.time() - started))
            except UpstreamError as exc:
                outcomes.append((exc.reason, loop.time() - started))
            if len(outcomes) == 3:
                finished.set_result(None)

        pool = upstream.pool(url)
        for body in (b"slow", b"fast", b"slow"):
            connection = await pool.connect()
            request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n" + body
            connection.start(request, head_only=False, timeout_s=timeout_s, done=done)
        await finished
        await asyncio.sleep(timeout_s)  # a sweep more: nothing else is reported
        upstream.close()
        return outcomes

    with scripted_server(handle) as (url, _):
        outcomes = asyncio.run(run(url))
    assert sorted(what for what, _ in outcomes) == ["done", "timeout", "timeout"]
    for what, after_s in outcomes:
        if what == "timeout":
            assert timeout_s <= after_s <= timeout_s * 1.25 + 1.0, outcomes  # slack: a busy CI


def test_large_answer_streams_in_pieces_and_arrives_whole() -> None:
    payload = bytes(range(256)) * ((3 * BUFFER_LIMIT_BYTES) // 256)
    seen: list[bytes] = []
    with scripted_server(keep_alive_handler([answer(payload), answer(b"next")], seen)) as (url, _):
        large, after = run_steps(url, Step(), Step())
    assert large.answer is not None
    assert large.answer.body is None  # streamed, not buffered
    assert large.body == payload
    assert after.body == b"next"
    assert large.connection is after.connection


def test_malformed_answer_is_broken() -> None:
    def handle(conn: socket.socket, _index: int) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\nx")
        conn.recv(1)

    with scripted_server(handle) as (url, _):
        (failed,) = run_steps(url, Step())
    assert failure(failed) == ("broken", False)


def test_head_answer_has_no_body_and_its_connection_is_not_reused() -> None:
    def handle(conn: socket.socket, index: int) -> None:
        read_request(conn)
        if index == 0:
            # A HEAD answer: the length of the body a GET would get, and no body.
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")
        else:
            conn.sendall(answer(b"after"))
        conn.recv(1)

    with scripted_server(handle) as (url, _):
        head, after = run_steps(url, Step(head_only=True), Step())
    assert (head.body, after.body) == (b"", b"after")
    assert head.connection is not after.connection


def test_early_answer_stops_a_streamed_upload() -> None:
    """A variant refusing a body on its declared length, before it has all arrived."""

    def handle(conn: socket.socket, _index: int) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 7\r\n\r\ntoo big")
        conn.recv(1)

    sent: list[int] = []

    async def slow_body() -> AsyncIterator[bytes]:
        for i in range(100):
            sent.append(i)
            yield b"x" * 1000
            await asyncio.sleep(0.05)

    async def run(url: str) -> Answer:
        upstream = Upstream(connect_timeout_s=5)
        try:
            connection = await upstream.pool(url).acquire()
            head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n"
            return await connection.exchange(
                head, slow_body(), head_only=False, chunked=False, timeout_s=5
            )
        finally:
            upstream.close()

    with scripted_server(handle) as (url, _):
        got = asyncio.run(run(url))
    assert (got.status, got.body) == (413, b"too big")
    # The answer was passed on as soon as it came: the upload stopped (it had 100 pieces to go).
    assert len(sent) < 100
