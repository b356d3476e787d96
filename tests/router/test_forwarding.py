"""The router's forwarding path, byte by byte on the client's side: real processes on loopback.

The edge hands a request whose small body arrived whole straight to the proxy, which sends it on
an idle kept-alive connection and answers from that connection's callback (no task, no ASGI);
every other request (chunked or large bodies, `Expect: 100-continue`, no idle connection, the
router's own endpoints) takes the task path. These tests mix both on one client connection and
break the variant's side under the fast one: pipelining, a client that leaves early, a kept-alive
connection the variant closes, a variant that stops answering.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np

from tests.processes import LOOPBACK, RunningProcess, route
from tests.router.scripted import Handler, read_request, scripted_server
from tests.router.test_router import INFER, infer_body, metric, routes

Answer = tuple[int, dict[bytes, bytes], bytes]
BODY = json.dumps(infer_body(np.zeros((1, 4), dtype=np.float32))).encode()
WAIT_S = 30.0


def read_answer(reader: io.BufferedReader, head_only: bool = False) -> Answer:
    """One answer from a client connection: status, headers (lower-case names), body (none
    after the head for a HEAD request's)."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[bytes, bytes] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if head_only:
        body = b""
    elif b"content-length" in headers:
        body = reader.read(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while size := int(reader.readline().split(b";")[0], 16):
            body += reader.read(size)
            reader.readline()
        reader.readline()
    else:
        body = b""
    return int(status_line.split(b" ")[1]), headers, body


def post(body: bytes, *extra: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: router\r\ncontent-length: %d\r\n" % (
        INFER.encode(),
        len(body),
    )
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


def chunked_post(body: bytes, *extra: bytes) -> bytes:
    head = b"POST %s HTTP/1.1\r\nhost: router\r\ntransfer-encoding: chunked\r\n" % INFER.encode()
    half = len(body) // 2
    first, second = body[:half], body[half:]
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(first), first, len(second), second)
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + chunks


def test_pipelined_requests_of_every_kind_are_answered_in_order(
    backends: dict[str, RunningProcess], tmp_path: Path
) -> None:
    """Fast-path, task-path, HEAD and the router's own endpoint, pipelined in one write."""
    config = tmp_path / "routes.json"
    config.write_text(routes({"v1": (backends["v1"].url, 100), "v2": (backends["v2"].url, 0)}))
    with route(config) as router:
        # Warm the pools, so that the fast path has idle connections to both variants.
        for variant in ("v1", "v2"):
            httpx.post(router.url + INFER, content=BODY, headers={"x-model-variant": variant})
        requests = [
            post(BODY, b"x-model-variant: v2"),
            chunked_post(BODY, b"x-model-variant: v1"),
            b"GET /v2/health/ready HTTP/1.1\r\nhost: router\r\n\r\n",
            b"HEAD /v2/models/iris HTTP/1.1\r\nhost: router\r\nx-model-variant: v2\r\n\r\n",
            post(BODY),
            post(BODY, b"x-model-variant: v2"),
        ]
        with socket.create_connection((LOOPBACK, router.port), timeout=WAIT_S) as client:
            reader = client.makefile("rb")
            client.sendall(b"".join(requests))
            answers = [read_answer(reader, r.startswith(b"HEAD")) for r in requests]
            client.sendall(post(BODY))  # the connection is still usable after the pipeline
            last = read_answer(reader)
    assert [answer[0] for answer in answers] == [200] * 6, answers
    served = [answer[1].get(b"x-model-variant") for answer in answers]
    assert served == [b"v2", b"v1", None, b"v2", b"v1", b"v2"]
    for index in (0, 1, 4, 5):  # the server that answered is the one named
        assert json.loads(answers[index][2])["model_version"] == served[index].decode()
    assert json.loads(answers[2][2])["ready"] is True
    assert answers[3][2] == b"" and int(answers[3][1][b"content-length"]) > 0
    assert last[0] == 200 and last[1][b"x-model-version"] == b"v1"


def echo_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@contextlib.contextmanager
def client_of_router_to(
    handler: Handler, tmp_path: Path, args: Sequence[str] = ()
) -> Iterator[tuple[RunningProcess, socket.socket, io.BufferedReader]]:
    """A router (with `args`) in front of one scripted variant (`handler`, all the weight), and
    a client connection to the router with a reader of its answers."""
    config = tmp_path / "routes.json"
    with scripted_server(handler) as (url, _):
        config.write_text(routes({"v1": (url, 100)}))
        with (
            route(config, args) as router,
            socket.create_connection((LOOPBACK, router.port), timeout=WAIT_S) as client,
        ):
            yield router, client, client.makefile("rb")


def test_a_client_leaving_before_its_answer_does_not_mix_up_later_answers(
    tmp_path: Path,
) -> None:
    """The dropped answer is read off its variant connection before that is used again."""

    def handler(conn: socket.socket, _index: int) -> None:
        while request := read_request(conn):
            body = request.partition(b"\r\n\r\n")[2]
            if body.startswith(b"slow"):
                time.sleep(0.3)
            conn.sendall(echo_answer(body))

    with client_of_router_to(handler, tmp_path) as (router, client, reader):
        for n in range(3):  # an idle connection to the variant
            client.sendall(post(b"warm-%d" % n))
            assert read_answer(reader)[2] == b"warm-%d" % n
        for n in range(4):
            with socket.create_connection((LOOPBACK, router.port)) as leaving:
                leaving.sendall(post(b"slow-%d" % n))
            client.sendall(post(b"own-%d" % n))
            assert read_answer(reader)[2] == b"own-%d" % n
        time.sleep(0.5)  # the slow answers arrive and are dropped
        for n in range(8):
            client.sendall(post(b"after-%d" % n))
            assert read_answer(reader)[2] == b"after-%d" % n


def three_requests(
    tmp_path: Path, on_second: Callable[[], None], args: list[str]
) -> tuple[list[Answer], str]:
    """`first`, `second`, `third` on one client connection to a router (with `args`) in front of
    a scripted variant that echoes each body, except on its first connection: there it reads
    `second`, calls `on_second()` and closes the connection without answering. The answers
    and the router's metrics."""

    def handler(conn: socket.socket, index: int) -> None:
        while request := read_request(conn):
            if index == 0 and b"second" in request:
                on_second()
                return
            conn.sendall(echo_answer(request.partition(b"\r\n\r\n")[2]))

    with client_of_router_to(handler, tmp_path, args) as (router, client, reader):
        got = []
        for body in (b"first", b"second", b"third"):
            client.sendall(post(body))
            got.append(read_answer(reader))
        return got, httpx.get(router.url + "/metrics").text


def test_a_kept_alive_connection_the_variant_closes_is_replaced_without_an_error(
    tmp_path: Path,
) -> None:
    """The variant reads the second request on its kept-alive connection and closes it: the
    router sends it again on a new connection to the same variant (nothing was answered)."""
    got, metrics = three_requests(tmp_path, lambda: None, [])
    assert [(status, body) for status, _, body in got] == [
        (200, b"first"),
        (200, b"second"),
        (200, b"third"),
    ]
    for reason in ("reset", "broken", "timeout", "unreachable"):
        labels = {"variant": "v1", "reason": reason}
        assert metric(metrics, "modeldeploy_router_backend_errors_total", **labels) == 0
    assert metric(metrics, "modeldeploy_router_retries_total", variant="v1") == 0


def test_a_variant_that_stops_answering_gets_a_504_and_the_client_keeps_its_connection(
    tmp_path: Path,
) -> None:
    """--timeout-s on a kept-alive variant connection: 504 in JSON, counted; the next request on
    the same client connection is answered (by a new variant connection)."""
    got, metrics = three_requests(tmp_path, lambda: time.sleep(3), ["--timeout-s", "0.5"])
    assert (got[0][0], got[0][2]) == (200, b"first")
    assert got[1][0] == 504 and got[1][1][b"x-model-variant"] == b"v1"
    assert "no answer in time" in json.loads(got[1][2])["error"]
    assert (got[2][0], got[2][2]) == (200, b"third")
    labels = {"variant": "v1", "reason": "timeout"}
    assert metric(metrics, "modeldeploy_router_backend_errors_total", **labels) == 1
    assert metric(metrics, "modeldeploy_router_requests_total", variant="v1", code="504") == 1


def test_expect_100_continue_is_answered_through_the_router(
    backends: dict[str, RunningProcess], tmp_path: Path
) -> None:
    """A client waiting for `100 Continue` before its body gets it (the task path), then the
    answer; the next request on the connection takes the fast path."""
    config = tmp_path / "routes.json"
    config.write_text(routes({"v1": (backends["v1"].url, 100), "v2": (backends["v2"].url, 0)}))
    with (
        route(config) as router,
        socket.create_connection((LOOPBACK, router.port), timeout=WAIT_S) as client,
    ):
        reader = client.makefile("rb")
        head = post(BODY, b"expect: 100-continue").partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        client.sendall(head)
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert reader.readline() == b"\r\n"
        client.sendall(BODY)
        first = read_answer(reader)
        client.sendall(post(BODY))
        second = read_answer(reader)
    assert first[0] == 200 and first[1][b"x-model-version"] == b"v1"
    assert second[0] == 200 and second[1][b"x-model-version"] == b"v1"


def test_answer_heads_keep_the_variant_s_lines_once_each(tmp_path: Path) -> None:
    """On the fast path the variant's header lines leave as it sent them (its Date too), with
    `x-model-variant` added; an answer with lines that must change (Connection, Server) has them
    rewritten (the router's own Date); a client that asks to close gets `connection: close`."""
    variant_date = b"date: Sat, 21 Nov 2026 09:00:00 GMT"
    plain = b"HTTP/1.1 200 OK\r\n%s\r\ncontent-length: 2\r\nx-custom: a\r\n\r\nok" % variant_date
    hop = b"HTTP/1.1 200 OK\r\n%s\r\nserver: other\r\nconnection: keep-alive\r\n" % variant_date
    hop += b"content-length: 2\r\nx-custom: b\r\n\r\nok"

    def handler(conn: socket.socket, _index: int) -> None:
        while request := read_request(conn):
            conn.sendall(hop if request.endswith(b"hop") else plain)

    def head_lines(reader: io.BufferedReader) -> list[bytes]:
        lines = []
        while (line := reader.readline()) not in (b"\r\n", b""):
            lines.append(line.rstrip(b"\r\n"))
        assert reader.read(2) == b"ok"
        return lines

    with client_of_router_to(handler, tmp_path) as (_, client, reader):
        client.sendall(post(b"warm"))  # no idle connection yet: the task path
        head_lines(reader)
        heads = []
        for request in (post(b"plain"), post(b"hop"), post(b"plain", b"connection: close")):
            client.sendall(request)  # one at a time: pipelined ones take the task path
            heads.append(head_lines(reader))
        passed, rewritten, closing = heads
        assert reader.read() == b""  # closed after the last answer
    assert passed == [
        b"HTTP/1.1 200 OK",
        variant_date,
        b"content-length: 2",
        b"x-custom: a",
        b"x-model-variant: v1",
    ]
    assert rewritten[0] == b"HTTP/1.1 200 OK"
    assert [line.partition(b":")[0] for line in rewritten[1:]] == [
        b"date",
        b"content-length",
        b"x-custom",
        b"x-model-variant",
    ]
    assert rewritten[1] != variant_date
    assert closing == [*passed, b"connection: close"]
