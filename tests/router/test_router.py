"""The router in front of real `modeldeploy-server serve` processes, over loopback.

Both variants serve the same iris model under the name `iris`, each with its own variant name as
model version (as the operator starts them), so every answer's `x-model-version` says which
server really answered, independently of the router's own `x-model-variant` header.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.models import BuiltModel
from tests.processes import (
    LOOPBACK,
    RunningProcess,
    free_port,
    route,
    serve_model,
    server_command,
)

MODEL = "iris"
INFER = f"/v2/models/{MODEL}/infer"
# Backends accept the big requests of the streaming test (60,000 rows).
SERVE_ARGS = ["--max-rows", "100000"]
FAST_RELOAD = ["--reload-interval-s", "0.1"]


class ConfigMapVolume:
    """A directory laid out the way the kubelet writes a ConfigMap volume, updated the same way.

    `routes.json -> ..data/routes.json` and `..data -> ..<version>/`; an update writes a new version
    directory and renames a new `..data` symlink over the old one, which is atomic.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "routes.json"
        self._generation = 0

    def publish(self, text: str) -> None:
        """Atomically replace the file's content, as a ConfigMap update does."""
        self._generation += 1
        version = self.root / f"..{self._generation}"
        version.mkdir()
        (version / "routes.json").write_text(text)
        staged = self.root / "..data_tmp"
        staged.symlink_to(version.name)
        staged.rename(self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/routes.json")
        if self._generation > 1:
            shutil.rmtree(self.root / f"..{self._generation - 1}")


def routes(
    variants: dict[str, tuple[str, int]],
    header: str = "x-model-variant",
    version: str | None = None,
) -> str:
    """A router config JSON: variant name -> (url, weight); `version` only when given."""
    return json.dumps(
        {
            **({"version": version} if version else {}),
            "model": MODEL,
            "headerOverride": header,
            "variants": [
                {"name": name, "url": url, "weight": weight}
                for name, (url, weight) in variants.items()
            ],
        }
    )


def infer_body(rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    """An Open Inference Protocol v2 request for iris feature rows."""
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }


def labels_of(answer: httpx.Response) -> list[int]:
    """The `label` output of a v2 inference answer."""
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    return [int(x) for x in outputs["label"]["data"]]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def within_binomial(count: int, n: int, p: float, sigmas: float) -> bool:
    """Whether `count` of `n` is within `sigmas` standard deviations of Binomial(n, p)'s mean."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def requests_answered(server_url: str) -> float:
    """The inference requests a model server has answered, whatever their protocol and status
    (its own /metrics)."""
    text = httpx.get(server_url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modeldeploy_requests_total"
    )


@pytest.fixture
def volume(tmp_path: Path) -> ConfigMapVolume:
    return ConfigMapVolume(tmp_path)


def split_config(backends: dict[str, RunningProcess], v1: int, v2: int) -> str:
    return routes({"v1": (backends["v1"].url, v1), "v2": (backends["v2"].url, v2)})


async def send_many(
    url: str, bodies: list[dict[str, Any]], headers: dict[str, str], concurrency: int = 16
) -> list[httpx.Response]:
    """POST every body, `concurrency` at a time, over pooled keep-alive connections."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with gate:
                return await client.post(url, json=body, headers=headers)

        return await asyncio.gather(*(one(body) for body in bodies))


def served_by(answers: list[httpx.Response]) -> Counter[str]:
    """Count answers by served variant, checking that the server that answered is the one named."""
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model-variant"] == answer.headers["x-model-version"]
    return Counter(answer.headers["x-model-variant"] for answer in answers)


@pytest.mark.slow
def test_2000_requests_split_90_10_within_binomial_bounds(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    volume.publish(split_config(backends, 90, 10))
    n = 2000
    rows = iris.features[np.arange(n) % len(iris.features)]
    with route(volume.path) as router:
        answers = asyncio.run(
            send_many(router.url + INFER, [infer_body(rows[i : i + 1]) for i in range(n)], {})
        )
        metrics = httpx.get(router.url + "/metrics").text
    counts = served_by(answers)
    # Five standard deviations of Binomial(2000, 0.1) is 67 requests: a fair router fails this
    # about once in two million runs, while 85/15 (+100) or 95/5 (-100) always fail.
    assert within_binomial(counts["v2"], n, 0.1, sigmas=5), counts
    assert counts["v1"] + counts["v2"] == n
    # The right answers came back: the model's predictions, row by row.
    assert [labels_of(a)[0] for a in answers] == iris.estimator.predict(rows).tolist()
    for variant in ("v1", "v2"):
        assert (
            metric(metrics, "modeldeploy_router_requests_total", variant=variant, code="200")
            == counts[variant]
        )
        assert (
            metric(metrics, "modeldeploy_router_request_duration_seconds_count", variant=variant)
            == counts[variant]
        )
    assert metric(metrics, "modeldeploy_router_variant_weight", variant="v1") == 90
    assert metric(metrics, "modeldeploy_router_variant_weight", variant="v2") == 10


@pytest.mark.slow
def test_the_split_holds_when_a_variant_has_no_idle_connection(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    """v2's server closes every connection 1 ms after answering, so the router never finds an
    idle one to it, while v1 always has one. The weights alone decide: a request drawn for v2
    must not be drawn again because its variant has no connection at hand (it was: v2 got about
    a tenth of its share, and 0 of the 40 requests after a cluster's Ready)."""
    n = 1000
    body = infer_body(iris.features[:1])
    with serve_model(iris.path, MODEL, "v2", [*SERVE_ARGS, "--keepalive-timeout-s", "0.001"]) as v2:
        volume.publish(routes({"v1": (backends["v1"].url, 90), "v2": (v2.url, 10)}))
        with route(volume.path) as router, httpx.Client(timeout=30) as client:
            answers = [client.post(router.url + INFER, json=body) for _ in range(n)]
    counts = served_by(answers)
    assert within_binomial(counts["v2"], n, 0.1, sigmas=5), counts


def test_override_header_and_versioned_path_pin_a_dark_variant(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    volume.publish(split_config(backends, 100, 0))
    body = infer_body(iris.features[:3])
    with route(volume.path) as router:
        unpinned = asyncio.run(send_many(router.url + INFER, [body] * 50, {}))
        pinned = asyncio.run(send_many(router.url + INFER, [body] * 50, {"x-model-variant": "v2"}))
        by_path = asyncio.run(
            send_many(router.url + f"/v2/models/{MODEL}/versions/v2/infer", [body] * 10, {})
        )
        metrics = httpx.get(router.url + "/metrics").text
    assert served_by(unpinned) == {"v1": 50}
    assert served_by(pinned) == {"v2": 50}
    assert served_by(by_path) == {"v2": 10}
    assert metric(metrics, "modeldeploy_router_requests_total", variant="v2", code="200") == 60


def test_custom_override_header_name(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    config = split_config(backends, 100, 0)
    volume.publish(config.replace('"x-model-variant"', '"X-Canary"'))
    with route(volume.path) as router:
        body = infer_body(iris.features[:1])
        answer = httpx.post(router.url + INFER, json=body, headers={"x-canary": "v2"})
        ignored = httpx.post(router.url + INFER, json=body, headers={"x-model-variant": "v2"})
    assert answer.headers["x-model-version"] == "v2"
    assert ignored.headers["x-model-version"] == "v1"


def test_sticky_header_keeps_each_user_on_one_variant(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    config = json.loads(split_config(backends, 50, 50))
    volume.publish(json.dumps({**config, "stickyHeader": "X-User"}))
    body = infer_body(iris.features[:1])
    users = [f"user-{i}" for i in range(40)]
    with route(volume.path) as router, httpx.Client() as client:
        first = {
            u: client.post(router.url + INFER, json=body, headers={"x-user": u}) for u in users
        }
        again = {
            u: client.post(router.url + INFER, json=body, headers={"x-user": u}) for u in users
        }
    served = {u: served_by([answer]) for u, answer in first.items()}
    assert served == {u: served_by([answer]) for u, answer in again.items()}
    # Both variants have a cohort: 40 users at 50/50 all on one side is a 1 in 2**39 event.
    assert sum(served.values(), Counter()).keys() == {"v1", "v2"}


def test_unknown_variant_in_override_is_a_404_naming_it(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    volume.publish(split_config(backends, 90, 10))
    with route(volume.path) as router:
        answer = httpx.post(
            router.url + INFER,
            json=infer_body(iris.features[:1]),
            headers={"x-model-variant": "v3"},
        )
        metrics = httpx.get(router.url + "/metrics").text
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert "x-model-variant" not in answer.headers
    assert answer.json() == {
        "error": "unknown variant 'v3' in header x-model-variant; known variants: v1, v2"
    }
    assert metric(metrics, "modeldeploy_router_requests_total", variant="", code="404") == 1


def test_all_weights_zero_is_503_and_not_ready_but_override_works(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    volume.publish(split_config(backends, 0, 0))
    body = infer_body(iris.features[:1])
    with route(volume.path, ready_path="/v2/health/live") as router:
        ready = httpx.get(router.url + "/v2/health/ready")
        unpinned = httpx.post(router.url + INFER, json=body)
        pinned = httpx.post(router.url + INFER, json=body, headers={"x-model-variant": "v1"})
    assert ready.status_code == 503
    assert "weight above 0" in ready.json()["error"]
    assert unpinned.status_code == 503
    assert "all weights are 0" in unpinned.json()["error"]
    assert pinned.status_code == 200
    assert pinned.headers["x-model-version"] == "v1"


def test_answers_pass_through_unchanged(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    """Status, body and headers of successes and of the server's own errors, byte for byte."""
    volume.publish(split_config(backends, 0, 100))
    direct_url = backends["v2"].url
    requests: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", INFER, json.dumps(infer_body(iris.features[:5])).encode(), {}),
        ("POST", INFER, b'{"inputs": [{"name": "input"}]}', {}),  # the server's 400
        ("POST", INFER, b"not json", {"content-type": "application/json"}),
        ("GET", f"/v2/models/{MODEL}", b"", {}),
        ("GET", f"/v2/models/{MODEL}/versions/v2/ready", b"", {}),
        ("GET", "/v2/models/nope", b"", {}),  # the server's 404
        ("GET", "/v2", b"", {}),
        ("POST", f"/v1/models/{MODEL}:predict", b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}', {}),
    ]
    with route(volume.path) as router, httpx.Client() as client:
        for method, path, content, headers in requests:
            direct = client.request(method, direct_url + path, content=content, headers=headers)
            routed = client.request(method, router.url + path, content=content, headers=headers)
            assert (routed.status_code, routed.content) == (direct.status_code, direct.content)
            assert routed.headers["x-model-variant"] == "v2"
            for name, value in direct.headers.items():
                if name not in ("date", "server"):
                    assert routed.headers.get(name) == value, (path, name)
        inferred = client.post(router.url + INFER, json=infer_body(iris.features[:1]))
    assert inferred.headers["x-model-sha256"] == iris.sha256
    assert inferred.headers["x-model-version"] == "v2"


def test_large_and_chunked_bodies_stream_through(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    """Bodies above the router's buffering limit (1 MiB), in both directions, and chunked ones."""
    volume.publish(split_config(backends, 100, 0))
    rows = iris.features[np.arange(60_000) % len(iris.features)]
    content = json.dumps(infer_body(rows)).encode()
    assert len(content) > 1 << 20

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(content), 100_000):
            yield content[start : start + 100_000]

    with route(volume.path) as router, httpx.Client(timeout=60) as client:
        direct = client.post(backends["v1"].url + INFER, content=content)
        routed = client.post(router.url + INFER, content=content)
        chunked = client.post(router.url + INFER, content=chunks())
    assert direct.status_code == 200, direct.text
    assert len(direct.content) > 1 << 20
    assert routed.content == direct.content
    assert chunked.content == direct.content
    assert labels_of(routed) == iris.estimator.predict(rows).tolist()


def test_weight_change_takes_effect_without_restart_and_bad_update_is_ignored(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    volume.publish(split_config(backends, 100, 0))
    body = infer_body(iris.features[:1])
    with route(volume.path, FAST_RELOAD) as router, httpx.Client() as client:
        assert served_by([client.post(router.url + INFER, json=body) for _ in range(20)]) == {
            "v1": 20
        }
        # A file may carry no version: the readiness body and the info metric say so.
        assert client.get(router.url + "/v2/health/ready").json()["routesVersion"] is None
        unversioned = client.get(router.url + "/metrics").text
        urls = {"v1": (backends["v1"].url, 0), "v2": (backends["v2"].url, 100)}
        volume.publish(routes(urls, version="b2"))
        deadline = time.monotonic() + 10
        while client.post(router.url + INFER, json=body).headers["x-model-variant"] != "v2":
            assert time.monotonic() < deadline, f"weights not reloaded:\n{router.output()}"
            time.sleep(0.05)
        assert served_by([client.post(router.url + INFER, json=body) for _ in range(20)]) == {
            "v2": 20
        }
        # A broken update is logged and ignored: traffic keeps flowing with the last good weights.
        volume.publish(split_config(backends, 50, 60))
        deadline = time.monotonic() + 10
        while "invalid routes" not in router.output():
            assert time.monotonic() < deadline, f"bad config not noticed:\n{router.output()}"
            time.sleep(0.05)
        assert served_by([client.post(router.url + INFER, json=body) for _ in range(20)]) == {
            "v2": 20
        }
        metrics = client.get(router.url + "/metrics").text
        ready = client.get(router.url + "/v2/health/ready")
        assert router.process.poll() is None
    assert "weights sum to 110" in router.output()
    assert ready.json() == {"ready": True, "routesVersion": "b2"}
    assert metric(unversioned, "modeldeploy_router_routes_info", version="") == 1
    assert metric(metrics, "modeldeploy_router_routes_info", version="b2") == 1
    assert metric(metrics, "modeldeploy_router_routes_info", version="") == 0
    assert metric(metrics, "modeldeploy_router_config_reloads_total", result="applied") == 1
    assert metric(metrics, "modeldeploy_router_config_reloads_total", result="rejected") == 1
    assert metric(metrics, "modeldeploy_router_variant_weight", variant="v2") == 100


def test_dead_backend_is_a_clean_502(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    dead = f"http://{LOOPBACK}:{free_port()}"
    volume.publish(routes({"v1": (backends["v1"].url, 100), "v2": (dead, 0)}))
    with route(volume.path) as router:
        answer = httpx.post(
            router.url + INFER,
            json=infer_body(iris.features[:1]),
            headers={"x-model-variant": "v2"},
            timeout=10,
        )
        metrics = httpx.get(router.url + "/metrics").text
        healthy = httpx.post(router.url + INFER, json=infer_body(iris.features[:1]))
    assert answer.status_code == 502
    assert answer.headers["x-model-variant"] == "v2"
    assert answer.json()["error"].startswith(f"variant 'v2' at {dead}: cannot connect")
    assert (
        metric(
            metrics, "modeldeploy_router_backend_errors_total", variant="v2", reason="unreachable"
        )
        == 1
    )
    assert metric(metrics, "modeldeploy_router_requests_total", variant="v2", code="502") == 1
    assert healthy.status_code == 200


def test_backend_that_never_answers_is_a_504(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    """A hung backend: the kernel accepts the connection, nothing ever answers."""
    with socket.socket() as hung:
        hung.bind((LOOPBACK, 0))
        hung.listen()
        hung_url = f"http://{LOOPBACK}:{hung.getsockname()[1]}"
        volume.publish(routes({"v1": (backends["v1"].url, 100), "v2": (hung_url, 0)}))
        with route(volume.path, ["--timeout-s", "0.5"]) as router:
            started = time.monotonic()
            answer = httpx.post(
                router.url + INFER,
                json=infer_body(iris.features[:1]),
                headers={"x-model-variant": "v2"},
                timeout=10,
            )
            elapsed = time.monotonic() - started
    assert answer.status_code == 504
    assert answer.json()["error"].startswith(f"variant 'v2' at {hung_url}: no answer in time")
    assert 0.4 < elapsed < 5


def test_client_leaving_mid_upload_is_counted_not_blamed_on_the_variant(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    """Both body paths: buffered (small Content-Length) and streamed (above the 1 MiB limit)."""
    volume.publish(split_config(backends, 100, 0))
    with route(volume.path) as router:
        for declared in (1000, 2_000_000):
            with socket.create_connection((LOOPBACK, router.port)) as client:
                head = f"POST {INFER} HTTP/1.1\r\nhost: router\r\ncontent-length: {declared}\r\n"
                client.sendall(head.encode() + b'content-type: application/json\r\n\r\n{"in')
                time.sleep(0.2)  # the router has started on the request
        deadline = time.monotonic() + 10
        while True:
            metrics = httpx.get(router.url + "/metrics").text
            gone = metric(metrics, "modeldeploy_router_requests_total", variant="v1", code="499")
            if gone == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        answer = httpx.post(router.url + INFER, json=infer_body(iris.features[:1]))
    assert gone == 2, router.output()
    assert (
        metric(metrics, "modeldeploy_router_backend_errors_total", variant="v1", reason="broken")
        == 0
    )
    assert "Traceback" not in router.output()
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("{", "config is not valid JSON"),
        ('{"model": "iris", "variants": []}', "variants: must be a non-empty list"),
        (
            routes({"v1": ("http://127.0.0.1:1", 90), "v2": ("http://127.0.0.1:2", 20)}),
            "variants: weights sum to 110; they must sum to 100 (or all be 0)",
        ),
    ],
)
def test_invalid_config_refuses_to_start_with_a_clear_message(
    tmp_path: Path, content: str | None, message: str
) -> None:
    config = tmp_path / "routes.json"
    if content is not None:
        config.write_text(content)
    done = subprocess.run(
        [*server_command(), "route", "--config", str(config), "--host", LOOPBACK, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"cannot start: routes {config}: " in done.stderr
    assert message in done.stderr


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(
    iris: BuiltModel, backends: dict[str, RunningProcess], volume: ConfigMapVolume
) -> None:
    """SIGTERM: new connections are refused, the request in flight still gets its answer."""
    volume.publish(split_config(backends, 100, 0))
    content = json.dumps(infer_body(iris.features[:1])).encode()

    def slow_upload() -> Iterator[bytes]:
        # Five pieces 0.4 s apart: the request is in flight for about two seconds.
        step = len(content) // 5 + 1
        for start in range(0, len(content), step):
            yield content[start : start + step]
            time.sleep(0.4)

    with route(volume.path) as router, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, router.url + INFER, content=slow_upload(), timeout=30)
        time.sleep(0.3)
        router.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while True:  # until the listener is closed
            try:
                httpx.get(router.url + "/v2/health/live", timeout=1)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                # Refused, or queued in the backlog as the listener closed and then dropped
                # unanswered: either way the probe was not served.
                break
            assert time.monotonic() < deadline, "still accepting 5 s after SIGTERM"
            time.sleep(0.02)
        # Refused while the request was still in flight, not merely after the process exited.
        assert not in_flight.done()
        answer = in_flight.result(timeout=30)
        assert router.process.wait(timeout=30) == 0
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-variant"] == "v1"
    assert labels_of(answer) == iris.estimator.predict(iris.features[:1]).tolist()
