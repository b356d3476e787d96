"""Scripted HTTP servers on loopback: a thread per connection, running a test's own handler."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

Handler = Callable[[socket.socket, int], None]
LOOPBACK = "127.0.0.1"


def read_request(conn: socket.socket) -> bytes:
    """Read one request head and its Content-Length body (or up to the last chunk)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        piece = conn.recv(65536)
        if not piece:
            break
        body += piece
    return head + b"\r\n\r\n" + body


@contextmanager
def scripted_server(handler: Handler) -> Iterator[tuple[str, list[bytes]]]:
    """A server calling `handler(connection, index)` for each accepted connection, in a thread.

    Yields its URL and the list of requests it read (handlers append to it).
    """
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def accept() -> None:
        index = 0
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=serve_one, args=(conn, index), daemon=True)
            thread.start()
            threads.append(thread)
            index += 1

    def serve_one(conn: socket.socket, index: int) -> None:
        with conn, suppress(OSError):
            handler(conn, index)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://{LOOPBACK}:{listener.getsockname()[1]}", []
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for thread in threads:
            thread.join(timeout=5)
