"""Shadow answers compared with the primary's, output by output (pure), and the shadow config."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from sklearn.datasets import load_iris

from modeldeploy_server.mirror import RESTART_DELAY_S
from modeldeploy_server.routing import ConfigError, ShadowConfig, parse_router_config
from modeldeploy_server.shadow import compare_answers
from modeldeploy_server.shadow_worker import DisagreementLog
from tests.processes import RunningProcess, route, serve_model
from tests.router.test_router import metric


def v2(*outputs: tuple[str, str, list[int], list[Any]]) -> bytes:
    return json.dumps(
        {
            "model_name": "iris",
            "outputs": [
                {"name": n, "datatype": t, "shape": s, "data": d} for n, t, s, d in outputs
            ],
        }
    ).encode()


LABELS = ("label", "INT64", [2], [0, 2])
SCORES = ("probabilities", "FP32", [2, 3], [0.9, 0.05, 0.05, 0.1, 0.2, 0.7])


@pytest.mark.parametrize(
    ("shadow", "agree", "difference", "detail"),
    [
        (v2(LABELS, SCORES), True, 0.0, ""),
        (
            v2(LABELS, ("probabilities", "FP32", [2, 3], [0.9, 0.05, 0.05, 0.1, 0.2, 0.70005])),
            True,
            pytest.approx(0.00005),
            "",
        ),
        (
            v2(LABELS, ("probabilities", "FP32", [2, 3], [0.8, 0.15, 0.05, 0.1, 0.2, 0.7])),
            False,
            pytest.approx(0.1),
            "probabilities: values differ by 0.1 > 0.0001",
        ),
        (
            v2(("label", "INT64", [2], [0, 1]), SCORES),
            False,
            0.0,
            "label: values differ",
        ),
        (
            v2(LABELS, ("probabilities", "FP32", [2, 3], [0.9, 0.05, 0.05, 0.1, 0.71, 0.7])),
            False,
            pytest.approx(0.51),
            "probabilities: argmax differs",
        ),
        (v2(LABELS), False, None, "probabilities: missing from the shadow answer"),
        (
            v2(LABELS, ("probabilities", "FP32", [3, 2], [0.9, 0.05, 0.05, 0.1, 0.2, 0.7])),
            False,
            None,
            "probabilities: shape [2, 3] vs [3, 2]",
        ),
    ],
)
def test_v2_outputs_compared_exactly_or_by_argmax_and_tolerance(
    shadow: bytes, agree: bool, difference: object, detail: str
) -> None:
    comparison = compare_answers(v2(LABELS, SCORES), shadow, tolerance=1e-4)
    assert (comparison.agree, comparison.max_abs_difference, comparison.detail) == (
        agree,
        difference,
        detail,
    )


def test_argmax_decides_even_within_tolerance() -> None:
    tie_break = v2(("p", "FP64", [1, 2], [0.50001, 0.49999]))
    flipped = v2(("p", "FP64", [1, 2], [0.49999, 0.50001]))
    assert not compare_answers(tie_break, flipped, tolerance=0.1).agree


def test_non_v2_answers_must_be_equal() -> None:
    assert compare_answers(b'{"predictions": [1]}', b'{"predictions": [1]}', 0.1).agree
    assert not compare_answers(b'{"predictions": [1]}', b'{"predictions": [2]}', 0.1).agree
    assert not compare_answers(b"not json", b"other", 0.1).agree


def routes(**shadow: Any) -> str:
    return json.dumps(
        {
            "model": "iris",
            "variants": [
                {"name": "v1", "url": "http://127.0.0.1:9001", "weight": 100},
                {"name": "v2", "url": "http://127.0.0.1:9002", "weight": 0},
            ],
            "shadow": shadow,
        }
    )


def test_disagreement_log_is_bounded_per_line_and_per_file(tmp_path: Path) -> None:
    """Lines over a quarter of the rotation size lose their payloads; one old file is kept."""
    small = {"primary": "v1", "shadow": "v2", "request": {"inputs": [1]}, "shadow_answer": 2}
    big = {**small, "request": {"inputs": ["x" * 5000]}}
    log = DisagreementLog(tmp_path / "lines.jsonl", max_bytes=4000)
    log.write(small)
    log.write(big)
    log.close()
    lines = (tmp_path / "lines.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        small,
        {"primary": "v1", "shadow": "v2", "payloads_omitted": True},
    ]
    path = tmp_path / "rotated.jsonl"
    log = DisagreementLog(path, max_bytes=4000)
    for index in range(300):
        log.write({**small, "index": index})
    log.close()
    older = [json.loads(line) for line in Path(f"{path}.1").read_text().splitlines()]
    newest = [json.loads(line) for line in path.read_text().splitlines()]
    indexes = [entry["index"] for entry in older + newest]
    assert indexes == list(range(indexes[0], 300))  # the newest lines, in order, none lost
    assert indexes[0] > 0  # older lines were rotated away
    assert not Path(f"{path}.2").exists()
    assert max(path.stat().st_size, Path(f"{path}.1").stat().st_size) <= 4000


def test_shadow_config_is_parsed_with_a_default_tolerance() -> None:
    config = parse_router_config(routes(variant="v2", percent=12.5))
    assert config.shadow == ShadowConfig(variant="v2", percent=12.5, tolerance=1e-4)
    assert parse_router_config(routes(variant="v2", percent=5, tolerance=0)).shadow == ShadowConfig(
        "v2", 5.0, 0.0
    )


@pytest.mark.parametrize(
    ("shadow", "message"),
    [
        ({"variant": "v3", "percent": 5}, "shadow.variant: 'v3' is not one of the variants"),
        ({"variant": "v1", "percent": 5}, "shadow.variant: 'v1' has weight 100; it must be 0"),
        ({"variant": "v2", "percent": 101}, "shadow.percent: 101 is not a number in 0..100"),
        ({"variant": "v2", "percent": True}, "shadow.percent: True is not a number"),
        ({"variant": "v2", "percent": 5, "tolerance": -1}, "shadow.tolerance: -1 is not"),
        ({"variant": "v2", "percent": 5, "mode": "x"}, "shadow: unknown field(s) mode"),
    ],
)
def test_invalid_shadow_config_is_refused(shadow: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_router_config(routes(**shadow))


# -- real processes: the two example models, which genuinely differ on a few iris rows -------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "models"
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def row_request(row: np.ndarray[Any, Any]) -> bytes:
    inputs = [
        {"name": name, "datatype": "FP32", "shape": [1, 1], "data": [float(value)]}
        for name, value in zip(FEATURES, row, strict=True)
    ]
    return json.dumps({"inputs": inputs}).encode()


def expected_disagreements(rows: np.ndarray[Any, Any]) -> list[int]:
    """Row indices where the models' labels or argmax differ, straight from onnxruntime."""
    outputs = []
    for version in ("v1", "v2"):
        session = ort.InferenceSession(str(EXAMPLES / f"iris-{version}.onnx"))
        feeds = {name: rows[:, i : i + 1] for i, name in enumerate(FEATURES)}
        labels, probabilities = session.run(["label", "probabilities"], feeds)
        outputs.append((labels, probabilities.argmax(axis=1)))
    (labels1, argmax1), (labels2, argmax2) = outputs
    return [int(i) for i in np.flatnonzero((labels1 != labels2) | (argmax1 != argmax2))]


def shadow_routes(v1_url: str, v2_url: str, shadow: dict[str, Any] | None) -> str:
    config: dict[str, Any] = {
        "model": "iris",
        "variants": [
            {"name": "v1", "url": v1_url, "weight": 100},
            {"name": "v2", "url": v2_url, "weight": 0},
        ],
    }
    if shadow is not None:
        config["shadow"] = shadow
    return json.dumps(config)


def shadow_counts(router: RunningProcess) -> dict[str, float]:
    text = httpx.get(router.url + "/metrics").text
    kinds = ("requests", "dropped", "errors", "agreements", "disagreements")
    counts = {
        kind: metric(text, f"modeldeploy_router_shadow_{kind}_total", primary="v1", shadow="v2")
        for kind in kinds
    }
    counts["compared"] = metric(
        text, "modeldeploy_router_shadow_abs_difference_count", primary="v1", shadow="v2"
    )
    return counts


@pytest.fixture(scope="module")
def example_variants() -> Iterator[tuple[RunningProcess, RunningProcess]]:
    with ExitStack() as stack:
        yield tuple(  # type: ignore[misc]
            stack.enter_context(serve_model(EXAMPLES / f"iris-{v}.onnx", "iris", v))
            for v in ("v1", "v2")
        )


@pytest.mark.slow
def test_shadow_disagreements_match_onnxruntime_and_primary_answers_are_unchanged(
    example_variants: tuple[RunningProcess, RunningProcess], tmp_path: Path
) -> None:
    v1, v2 = example_variants
    rows = load_iris().data.astype(np.float32)
    disagreeing = expected_disagreements(rows)
    assert 0 < len(disagreeing) < len(rows) // 4  # the models differ, on a few rows
    config = tmp_path / "routes.json"
    log_path = tmp_path / "disagreements.jsonl"
    bodies = [row_request(row) for row in rows]
    # Tolerance 1: float scores agree unless the argmax moves; labels must be equal.
    config.write_text(
        shadow_routes(v1.url, v2.url, {"variant": "v2", "percent": 100, "tolerance": 1})
    )
    shadow_args = ["--shadow-log", str(log_path), "--shadow-log-sample", "1"]
    with route(config, shadow_args) as router, httpx.Client(timeout=30) as client:
        shadowed = [client.post(router.url + "/v2/models/iris/infer", content=b) for b in bodies]
        deadline = time.monotonic() + 60
        while (counts := shadow_counts(router))["agreements"] + counts["disagreements"] + counts[
            "errors"
        ] < len(rows):
            assert time.monotonic() < deadline, counts
            time.sleep(0.1)
    config.write_text(shadow_routes(v1.url, v2.url, None))
    with route(config) as router, httpx.Client(timeout=30) as client:
        plain = [client.post(router.url + "/v2/models/iris/infer", content=b) for b in bodies]
    assert counts == {
        "requests": len(rows),
        "dropped": 0,
        "errors": 0,
        "agreements": len(rows) - len(disagreeing),
        "disagreements": len(disagreeing),
        "compared": len(rows),
    }
    # The users' answers: all from v1, byte for byte what they are without a shadow.
    assert [a.status_code for a in shadowed] == [200] * len(rows)
    assert {a.headers["x-model-variant"] for a in shadowed} == {"v1"}
    assert [a.content for a in shadowed] == [a.content for a in plain]
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(logged) == len(disagreeing)
    assert sorted([entry["request"]["inputs"][0]["data"][0] for entry in logged]) == sorted(
        float(rows[i, 0]) for i in disagreeing
    )
    assert all(entry["primary_answer"]["model_version"] == "v1" for entry in logged)
    assert all(entry["shadow_answer"]["model_version"] == "v2" for entry in logged)


def test_full_shadow_queue_drops_and_counts_without_touching_users(
    example_variants: tuple[RunningProcess, RunningProcess], tmp_path: Path
) -> None:
    """The shadow accepts connections and never answers: the first 2 copies stay in the shadow
    worker's hands (sent, unanswered), the other 38 drop."""
    v1, _ = example_variants
    body = row_request(load_iris().data[0].astype(np.float32))
    with socket.create_server(("127.0.0.1", 0), backlog=64) as hung:
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        config = tmp_path / "routes.json"
        config.write_text(shadow_routes(v1.url, hung_url, {"variant": "v2", "percent": 100}))
        with route(config, ["--shadow-queue", "2"]) as router, httpx.Client(timeout=30) as client:
            answers = [
                client.post(router.url + "/v2/models/iris/infer", content=body) for _ in range(40)
            ]
            counts = shadow_counts(router)
    assert [a.status_code for a in answers] == [200] * 40
    assert counts["requests"] == 40
    assert counts["dropped"] == 40 - 2
    assert counts["agreements"] + counts["disagreements"] == 0


def applied_reloads(router: RunningProcess) -> float:
    text = httpx.get(router.url + "/metrics").text
    return metric(text, "modeldeploy_router_config_reloads_total", result="applied")


def test_killed_shadow_worker_is_replaced_and_its_copies_counted(
    example_variants: tuple[RunningProcess, RunningProcess], tmp_path: Path
) -> None:
    """SIGKILL the worker process with copies in its hands (the shadow never answers): users
    still get v1's answers, the copies it held count as errors, and a copy after the restart
    delay starts a new worker that compares again."""
    v1, v2 = example_variants
    body = row_request(load_iris().data[0].astype(np.float32))
    with socket.create_server(("127.0.0.1", 0), backlog=64) as hung:
        config = tmp_path / "routes.json"
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        config.write_text(shadow_routes(v1.url, hung_url, {"variant": "v2", "percent": 100}))
        with route(config, ["--shadow-queue", "3"]) as router, httpx.Client(timeout=30) as client:
            url = router.url + "/v2/models/iris/infer"
            reloads = applied_reloads(router)
            before = [client.post(url, content=body) for _ in range(5)]
            (worker,) = psutil.Process(router.process.pid).children()
            assert "modeldeploy_server.shadow_worker" in " ".join(worker.cmdline())
            worker.kill()
            deadline = time.monotonic() + 10
            while shadow_counts(router)["errors"] < 3:
                assert time.monotonic() < deadline, router.output()
                time.sleep(0.05)
            # Point the shadow at a live v2: the replacement compares its copies.
            config.write_text(shadow_routes(v1.url, v2.url, {"variant": "v2", "percent": 100}))
            while applied_reloads(router) <= reloads:
                assert time.monotonic() < deadline + 10, router.output()
                time.sleep(0.05)
            time.sleep(RESTART_DELAY_S)  # no worker starts before it has passed
            after = [client.post(url, content=body) for _ in range(5)]
            while (counts := shadow_counts(router))["compared"] < 3:
                assert time.monotonic() < deadline + 20, (counts, router.output())
                time.sleep(0.05)
            (replacement,) = psutil.Process(router.process.pid).children()
    assert replacement.pid != worker.pid
    assert [a.status_code for a in before + after] == [200] * 10
    assert {a.headers["x-model-variant"] for a in before + after} == {"v1"}
    assert counts["requests"] == 10
    assert counts["errors"] == 3  # the copies the killed worker held
    assert counts["dropped"] == 2 + 2  # offered while a worker held 3
    assert counts["agreements"] + counts["disagreements"] == 3
    assert "the shadow worker exited" in router.output()
