"""Hostile clients on real sockets, against `serve` and against `route` (one HTTP edge, edge.py).

Each test attacks one limit and asserts the answer that limit gives, while a well-behaved client
on its own keep-alive connection keeps asking and must get every answer right.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvloop

from modeldeploy_server.config import EdgeSettings
from modeldeploy_server.edge import BACKOFF_STATE_KEY
from modeldeploy_server.http_server import DrainingServer, build_server
from tests.models import BuiltModel
from tests.processes import LOOPBACK, RunningProcess, route, serve_model

MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 40
READ_TIMEOUT_S = 2
BODY_BUDGET = 4_000_000
LIMITS = [
    "--max-header-bytes", str(MAX_HEADER_BYTES),
    "--max-connections", str(MAX_CONNECTIONS),
    "--read-timeout-s", str(READ_TIMEOUT_S),
    "--keepalive-timeout-s", "2",
    "--max-body-bytes-in-flight", str(BODY_BUDGET),
]  # fmt: skip
INFER = "/v2/models/iris/infer"
# Generous: the machine running the tests may be busy; the limits under test are far shorter.
WAIT_S = 30


def router_config(path: Path, backend: RunningProcess) -> Path:
    variants = [{"name": "v1", "url": backend.url, "weight": 100}]
    path.write_text(json.dumps({"model": "iris", "variants": variants}))
    return path


@contextlib.contextmanager
def edge_target(
    kind: str, iris: BuiltModel, tmp: Path, extra: list[str]
) -> Iterator[RunningProcess]:
    """`serve` with the limits, or `route` with the limits in front of a plain `serve`."""
    if kind == "serve":
        limited = [*LIMITS, "--max-request-bytes", "1000000", *extra]
        with serve_model(iris.path, "iris", extra_args=limited) as server:
            yield server
    else:
        with (
            serve_model(iris.path, "iris") as backend,
            route(router_config(tmp / "routes.json", backend), [*LIMITS, *extra]) as router,
        ):
            yield router


@pytest.fixture(scope="module", params=["serve", "route"])
def target(
    request: pytest.FixtureRequest, iris: BuiltModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProcess]:
    with edge_target(request.param, iris, tmp_path_factory.mktemp("edge"), []) as process:
        yield process


def infer_body(iris: BuiltModel, rows: slice) -> bytes:
    data = np.asarray(iris.features[rows], dtype=np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(data.shape)}
    return json.dumps({"inputs": [{**tensor, "data": data.ravel().tolist()}]}).encode()


class GoodClient:
    """A well-behaved client: one keep-alive connection, one request after another."""

    def __init__(self, url: str, iris: BuiltModel) -> None:
        self._url = url + INFER
        self._body = infer_body(iris, slice(0, 5))
        self._expected = iris.estimator.predict(iris.features[:5]).tolist()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.answers = 0
        self.failures: list[str] = []

    def _loop(self) -> None:
        with httpx.Client(timeout=WAIT_S) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(self._url, content=self._body)
                    labels = answer.json()["outputs"][0]["data"]
                    if answer.status_code != 200 or labels != self._expected:
                        self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.answers += 1
                time.sleep(0.02)

    def __enter__(self) -> GoodClient:
        self._thread.start()
        deadline = time.monotonic() + WAIT_S
        while self.answers == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        before = self.answers
        deadline = time.monotonic() + WAIT_S
        while self.answers < before + 2 and time.monotonic() < deadline:  # still answered after
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(WAIT_S)
        assert self.failures == []
        assert self.answers >= before + 2


def connect(target: RunningProcess) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, target.port), timeout=WAIT_S)
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server still takes; it may have answered and stopped reading."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def read_answer(sock: socket.socket) -> bytes:
    """Everything until the server closes (every refusal closes), or WAIT_S."""
    received = b""
    deadline = time.monotonic() + WAIT_S
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def assert_refusal(answer: bytes, status: int, message: str) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head.lower()
    assert b"connection: close" in head.lower()
    assert message in json.loads(body)["error"]


def head_of(path: str, extra: bytes = b"", method: bytes = b"POST") -> bytes:
    return method + b" " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n" + extra


def test_huge_headers_get_431_and_cost_nothing(target: RunningProcess, iris: BuiltModel) -> None:
    body = infer_body(iris, slice(0, 1))
    within = b"x-pad: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    over = b"x-pad: " + b"a" * MAX_HEADER_BYTES + b"\r\n"
    complete = b"content-length: %d\r\n\r\n" % len(body) + body
    with GoodClient(target.url, iris):
        streams = [connect(target) for _ in range(8)]
        for sock in streams:  # each starts a 1 MiB header, 64 KiB at a time
            send_quietly(sock, head_of(INFER, b"x-big: "))
        for _ in range(16):
            for sock in streams:
                send_quietly(sock, b"b" * 65536)
        for sock in streams:
            assert_refusal(read_answer(sock), 431, f"over {MAX_HEADER_BYTES} bytes")
            sock.close()
        with connect(target) as sock:
            sock.sendall(head_of(INFER, over + complete))
            assert_refusal(read_answer(sock), 431, "request line and headers are over")
        with connect(target) as sock:
            sock.sendall(head_of(INFER, within + b"connection: close\r\n" + complete))
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")


def test_slow_idle_and_stalled_clients_time_out(target: RunningProcess, iris: BuiltModel) -> None:
    body = infer_body(iris, slice(0, 1))
    with GoodClient(target.url, iris):
        slowloris = [connect(target) for _ in range(20)]
        idle = connect(target)
        kept_alive = connect(target)  # asks once, then stays silent: closed after keep-alive
        kept_alive.sendall(head_of(INFER, b"content-length: %d\r\n\r\n" % len(body)) + body)
        stalled_body = connect(target)
        stalled_body.sendall(head_of(INFER, b"content-length: %d\r\n\r\n" % len(body)) + body[:5])
        started = time.monotonic()
        head = head_of(INFER, b"x-slow: ")
        for sent in range(len(head) + 2 * READ_TIMEOUT_S * 10):
            if time.monotonic() - started > 2 * READ_TIMEOUT_S:
                break
            for sock in slowloris:  # one byte per connection every 0.1 s
                send_quietly(sock, (head + b"z" * 1000)[sent : sent + 1])
            time.sleep(0.1)
        for sock in [*slowloris, stalled_body]:
            assert_refusal(read_answer(sock), 408, f"did not arrive within {READ_TIMEOUT_S} s")
            sock.close()
        assert read_answer(idle) == b""  # nothing was asked: closed without a word
        idle.close()
        assert read_answer(kept_alive).startswith(b"HTTP/1.1 200 ")
        assert kept_alive.recv(1) == b""  # closed, not timed out (that raises)
        kept_alive.close()


def test_connections_over_the_limit_are_refused_at_once(
    target: RunningProcess, iris: BuiltModel
) -> None:
    with GoodClient(target.url, iris):
        held = [connect(target) for _ in range(MAX_CONNECTIONS + 20)]
        refused = []
        for sock in held:
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                if sock.recv(1, socket.MSG_PEEK):
                    refused.append(read_answer(sock))
        for sock in held:
            sock.close()
    # The good client holds one of the slots; held connections may time out meanwhile.
    assert 1 <= len(refused) <= 21
    for answer in refused:
        assert_refusal(answer, 503, f"over the limit of {MAX_CONNECTIONS} connections")
        assert b"retry-after: 1" in answer
    assert httpx.get(target.url + "/v2/health/live", timeout=WAIT_S).status_code == 200


def test_request_bodies_in_flight_are_bounded_process_wide(
    target: RunningProcess, iris: BuiltModel
) -> None:
    near_limit = 900_000
    head = head_of(
        INFER, b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % near_limit
    )
    with GoodClient(target.url, iris), contextlib.ExitStack() as stack:
        holders = [stack.enter_context(connect(target)) for _ in range(6)]
        for sock in holders:
            sock.sendall(head + b"{" * 1000)
        # Four bodies fit in the budget (4 x 900 kB of 4 MB); the others are refused at once,
        # well before the read timeout ends the four.
        readable: list[socket.socket] = []
        deadline = time.monotonic() + READ_TIMEOUT_S * 0.75
        while len(readable) < 2 and time.monotonic() < deadline:
            readable = select.select(holders, [], [], 0.05)[0]
        time.sleep(0.1)
        assert select.select(holders, [], [], 0)[0] == readable
        assert len(readable) == 2
        for sock in readable:
            answer = read_answer(sock)
            assert_refusal(answer, 503, "too many request bytes in flight")
            assert b"retry-after: 1" in answer


def test_chunked_trailers_are_never_headers(target: RunningProcess, iris: BuiltModel) -> None:
    records = json.dumps({"instances": iris.features[:3].tolist()}).encode()
    chunked = b"%x\r\n%s\r\n0\r\ncontent-type: text/csv\r\naccept: text/csv\r\n\r\n" % (
        len(records),
        records,
    )
    head = b"content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
    with GoodClient(target.url, iris), connect(target) as sock:
        sock.sendall(head_of("/v1/models/iris:predict", head + b"\r\n" + chunked))
        answer = read_answer(sock)
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200 "), answer[:300]
    labels = [row["label"] for row in json.loads(body)["predictions"]]
    assert labels == iris.estimator.predict(iris.features[:3]).tolist()


def test_options_star_is_answered(target: RunningProcess, iris: BuiltModel) -> None:
    with GoodClient(target.url, iris):
        with connect(target) as sock:
            sock.sendall(b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nallow: GET, HEAD, POST\r\n" in answer
        with connect(target) as sock:
            sock.sendall(b"GET * HTTP/1.1\r\nhost: x\r\n\r\n")
            assert_refusal(read_answer(sock), 400, "only valid for OPTIONS")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nhost: x\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the HTTP port
    ],
    ids=range(8),
)
def test_malformed_requests_get_a_json_400(
    target: RunningProcess, iris: BuiltModel, request_bytes: bytes
) -> None:
    with GoodClient(target.url, iris), connect(target) as sock:
        sock.sendall(request_bytes)
        assert_refusal(read_answer(sock), 400, "malformed")


@pytest.mark.parametrize("kind", ["serve", "route"])
def test_sigterm_drains_keep_alive_connections_without_dropping(
    kind: str, iris: BuiltModel, tmp_path: Path
) -> None:
    delay = ["--shutdown-delay-s", "3"]
    with edge_target(kind, iris, tmp_path, delay) as target, httpx.Client(timeout=WAIT_S) as client:
        body = infer_body(iris, slice(0, 2))
        first = client.post(target.url + INFER, content=body)
        assert first.status_code == 200 and first.headers.get("connection") != "close"
        target.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S
        while client.get(target.url + "/v2/health/ready").status_code != 503:
            assert time.monotonic() < deadline
        # The port is still open and answers, each answer closing its connection.
        again = client.post(target.url + INFER, content=body)
        assert again.status_code == 200 and again.headers["connection"] == "close"
        assert again.json() == first.json()
        assert target.process.wait(WAIT_S) == 0


async def backoff_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers /busy with 503 and asks its connection to back off 1 s; anything else 200."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    status = 200
    if scope["path"] == "/busy":
        scope["state"][BACKOFF_STATE_KEY] = 1.0
        status = 503
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


@contextlib.contextmanager
def in_process_server(app: Any) -> Iterator[int]:
    """`app` behind the edge (build_server) in a thread of this process; yields its port."""
    with in_process_edge(app, EdgeSettings(shutdown_delay_s=0)) as (_, port):
        yield port


@contextlib.contextmanager
def in_process_edge(app: Any, settings: EdgeSettings) -> Iterator[tuple[DrainingServer, int]]:
    """`app` behind the edge with `settings` in a thread of this process: the server, its port."""
    server = build_server(
        app, host=LOOPBACK, port=0, access_log=False, graceful_shutdown_s=1,
        edge=settings, on_drain=lambda: None, log_config=None,
    )  # fmt: skip
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


def test_a_request_reaching_an_idle_connection_at_shutdown_is_answered() -> None:
    """A kept-alive connection idle when the server shuts down (its port already closed) is not
    cut at once: a request that reaches it within the grace is answered, closing it. Without the
    grace, uvicorn closes it and the request is lost (a client that sent it gets no answer)."""
    settings = EdgeSettings(shutdown_delay_s=0, shutdown_grace_s=WAIT_S / 2)
    request = b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n"
    with (
        in_process_edge(backoff_app, settings) as (server, port),
        socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as sock,
    ):
        sock.sendall(request)
        kept = b""
        while not kept.endswith(b"\r\n\r\n"):  # the answer has no body: its head, kept alive
            kept += sock.recv(65536)
        assert kept.startswith(b"HTTP/1.1 200") and b"connection: close" not in kept.lower()
        server.handle_exit(signal.SIGTERM, None)  # with no shutdown delay: the port closes now
        deadline = time.monotonic() + WAIT_S
        while _accepts(port):  # until the port is closed, and so the connections shut down
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.sendall(request)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()


def test_a_connection_in_the_listen_queue_when_the_port_closes_is_answered() -> None:
    """A client whose connection the kernel accepted, with its request sent, but which the
    server had not taken in yet when it closed its port, gets its answer: without the drain of
    the listen queue, closing the port resets that connection and the request is lost."""
    request = b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n"
    answers: list[bytes] = []

    async def scenario() -> None:
        server = build_server(
            backoff_app, host=LOOPBACK, port=0, access_log=False, graceful_shutdown_s=1,
            edge=EdgeSettings(shutdown_delay_s=0), on_drain=lambda: None, log_config=None,
        )  # fmt: skip
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        listening = socket.socket()
        listening.bind((LOOPBACK, 0))
        await server.startup(sockets=[listening])
        server.edge.draining = True  # as SIGTERM does
        # The event loop does not run between this connect and the shutdown below: the
        # connection waits in the listen queue, its request sent.
        client = socket.create_connection(listening.getsockname(), timeout=WAIT_S)
        client.sendall(request)
        reader = threading.Thread(target=lambda: answers.append(read_answer(client)))
        reader.start()
        await server.shutdown(sockets=[listening])
        await asyncio.to_thread(reader.join, WAIT_S)
        client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
    assert answers and answers[0].startswith(b"HTTP/1.1 200 "), answers
    assert b"connection: close" in answers[0].lower()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return False
    return True


def test_an_overload_refusal_pauses_only_its_own_connection() -> None:
    """Clients that ignore Retry-After cannot keep the server busy refusing them."""
    with (
        in_process_server(backoff_app) as port,
        socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as retrying,
    ):
        retrying.sendall(b"GET /busy HTTP/1.1\r\nhost: x\r\n\r\n")
        assert retrying.recv(100).startswith(b"HTTP/1.1 503 ")
        started = time.monotonic()
        retrying.sendall(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        with socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as other:
            other.sendall(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
            assert other.recv(100).startswith(b"HTTP/1.1 200 ")
        assert retrying.recv(100).startswith(b"HTTP/1.1 200 ")
        assert time.monotonic() - started >= 0.9  # read only after the back-off


def late_body_app(release: threading.Event) -> Any:
    """An ASGI app whose /late answer sends its head, then its body once `release` is set."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while not release.is_set():
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"late", "more_body": False})
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-length", b"5"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"whole"})

    return app


def read_until(sock: socket.socket, end: bytes) -> bytes:
    received = b""
    while not received.endswith(end):
        piece = sock.recv(65536)
        assert piece, f"connection closed after {received!r}"
        received += piece
    return received


def test_answer_heads_are_written_with_their_bodies_and_never_wait_for_a_late_one() -> None:
    """The edge joins an answer's head to its body (one write); a head whose body comes later,
    a HEAD answer's head, and a 100 Continue still go out at once, in order."""
    release = threading.Event()
    try:
        with (
            in_process_server(late_body_app(release)) as port,
            socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as client,
        ):
            client.sendall(b"GET /whole HTTP/1.1\r\nhost: x\r\n\r\n")
            assert read_until(client, b"whole").startswith(b"HTTP/1.1 200 OK\r\n")
            # The body waits for the client to have the head (the head is not held for it).
            client.sendall(b"GET /late HTTP/1.1\r\nhost: x\r\n\r\n")
            head = read_until(client, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in head
            release.set()
            assert read_until(client, b"0\r\n\r\n") == b"4\r\nlate\r\n0\r\n\r\n"
            # HEAD: uvicorn writes no body at all; the head still arrives, and the connection
            # carries the next exchange.
            client.sendall(b"HEAD /whole HTTP/1.1\r\nhost: x\r\n\r\n")
            head = read_until(client, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5" in head
            client.sendall(
                b"POST /whole HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                b"content-length: 2\r\n\r\n"
            )
            assert read_until(client, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            client.sendall(b"{}")
            answer = read_until(client, b"whole")
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.count(b"HTTP/1.1") == 1
    finally:
        release.set()


async def header_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the header the path names: a valid one, or one that would inject a line."""
    if scope["type"] != "http":
        return
    header = {
        "/tab": (b"x-tab", b"a\tb"),
        "/latin": (b"x-latin", "é".encode("latin-1")),
        "/line-in-value": (b"x-echo", b"a\r\nx-injected: 1"),
        "/nul-in-value": (b"x-echo", b"a\x00b"),
        "/space-in-name": (b"x bad", b"1"),
        "/colon-in-name": (b"x-injected: 1\r\nx", b"1"),
    }[scope["path"]]
    headers = [(b"content-length", b"2"), header]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    "path", ["/line-in-value", "/nul-in-value", "/space-in-name", "/colon-in-name"]
)
def test_an_answer_header_that_would_break_the_head_is_never_written(path: str) -> None:
    with in_process_server(header_app) as port:
        for valid, expected in (("/tab", b"x-tab: a\tb\r\n"), ("/latin", b"x-latin: \xe9\r\n")):
            with socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as client:
                client.sendall(f"GET {valid} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                answer = read_until(client, b"ok")
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and expected in answer
        with socket.create_connection((LOOPBACK, port), timeout=WAIT_S) as client:
            client.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            assert read_answer(client) == b""  # closed: nothing of the head went out
