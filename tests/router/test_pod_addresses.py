"""A variant whose name has several addresses, as a headless Service's has (one per ready pod):
the router spreads its connections over them and moves on from one that refuses (a pod gone).

The router runs in a mount namespace of its own, whose /etc/hosts gives one name three loopback
addresses; real servers of the model listen on the same port of some of them, as pods would.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.models import BuiltModel
from tests.processes import RunningProcess, free_port, route, serve_model
from tests.router.test_router import INFER, MODEL, SERVE_ARGS, infer_body, requests_answered

NAME = "pods.variant.test"
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# Slow enough (rows per request) that the clients keep dozens of requests in the router at once,
# each on a connection of its own to the variant.
ROWS = 2000
CLIENTS = 48


def _can_unshare() -> bool:
    try:
        done = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _can_unshare(), reason="needs `unshare --mount` (root, or user namespaces)"
)


def router_resolving(tmp_path: Path, port: int) -> AbstractContextManager[RunningProcess]:
    """A router whose only variant is http://NAME:port, NAME resolving to ADDRESSES."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in ADDRESSES))
    config = tmp_path / "routes.json"
    variants = [{"name": "v1", "url": f"http://{NAME}:{port}", "weight": 100}]
    config.write_text(json.dumps({"model": MODEL, "variants": variants}))
    bind_hosts = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return route(config, prefix=["unshare", "--mount", "sh", "-c", bind_hosts, str(hosts)])


@pytest.fixture
def pods(iris: BuiltModel) -> Iterator[tuple[int, dict[str, RunningProcess]]]:
    """Servers on the first two addresses, one port: the third address refuses connections."""
    port = free_port()
    with ExitStack() as stack:
        yield (
            port,
            {
                address: stack.enter_context(
                    serve_model(iris.path, MODEL, "v1", SERVE_ARGS, host=address, port=port)
                )
                for address in ADDRESSES[:2]
            },
        )


def statuses(url: str, requests: int) -> list[int]:
    """The status of each of `requests` requests, CLIENTS at a time, a connection per client."""
    rows = np.tile(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32), (ROWS, 1))
    body = json.dumps(infer_body(rows)).encode()

    def send(_: int) -> int:
        return httpx.post(url + INFER, content=body, timeout=30).status_code

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(send, range(requests)))


def test_connections_spread_over_the_addresses_and_skip_those_that_refuse(
    tmp_path: Path, pods: tuple[int, dict[str, RunningProcess]]
) -> None:
    port, servers = pods
    with router_resolving(tmp_path, port) as router:
        # Every connection the router opens tries the addresses in a new random order: a third
        # of the time the refusing one comes first, and the next one is tried.
        assert statuses(router.url, 480) == [200] * 480
        shares = {address: requests_answered(server.url) for address, server in servers.items()}
        assert sum(shares.values()) == 480
        assert min(shares.values()) > 0, shares
        # One pod gone as well: the only address left serves every new connection.
        first, second = servers.values()
        first.close()
        before = requests_answered(second.url)
        assert statuses(router.url, 96) == [200] * 96
        assert requests_answered(second.url) - before == 96
