"""`modeldeploy run` rolls out an edit of its YAML file as the operator would: the same plan, judged
on the local router's own /metrics, its steps written into the router's routes file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.local.test_run import (
    EXAMPLE,
    START_TIMEOUT_S,
    _model_uri,
    iris_rows,
    start_run,
    stop_run,
    v2_body,
    write_manifest,
)

pytestmark = pytest.mark.slow

RATE_PER_S = 20.0
MAX_REQUESTS = 5_000


def manifest(v1: int, v2: int) -> dict[str, Any]:
    """examples/iris.yaml with file:// models, weights v1/v2, reached in two 50%-steps of 2 s."""
    obj: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    for variant, weight in zip(obj["spec"]["variants"], (v1, v2), strict=True):
        variant["model"] = _model_uri(variant["name"])
        variant["weight"] = weight
    obj["spec"]["rollout"] = {
        "steps": [{"percent": 50, "holdSeconds": 2}],
        "analysis": {"errorRate": {"max": 0.05}},
        "minSamples": 5,
        "intervalSeconds": 5,
    }
    return obj


def test_an_edit_is_rolled_out_step_by_step_on_the_local_routers_metrics(tmp_path: Path) -> None:
    path = write_manifest(manifest(100, 0), tmp_path)
    run = start_run(path, tmp_path)
    stop = threading.Event()
    codes: dict[int, int] = {}

    def users() -> None:
        body = v2_body(iris_rows()[:1])
        with httpx.Client(timeout=10) as client:
            for _ in range(MAX_REQUESTS):
                code = client.post(f"{run.url}/v2/models/iris/infer", json=body).status_code
                codes[code] = codes.get(code, 0) + 1
                if stop.wait(1 / RATE_PER_S):
                    return

    traffic = threading.Thread(target=users, daemon=True)
    try:
        run.wait_for_line(r"^Ready: iris", START_TIMEOUT_S)
        traffic.start()
        # The edit: all of the traffic to v2, through the steps.
        path.write_text(yaml.safe_dump(manifest(0, 100)))
        run.wait_for_line(r"edit: generation 2, spec weights v1=0,v2=100", 60)
        run.wait_for_line(r"routes: v1=50,v2=50", 60)
        passed = run.wait_for_line(r"rollout StepPassed: .*", 120)
        run.wait_for_line(r"rollout Promoted: all 1 steps passed", 60)
        run.wait_for_line(r"routes: v1=0,v2=100", 60)
    finally:
        stop.set()
        traffic.join(timeout=15)
        stop_run(run)
    print(f"\n{run.output()}\nanswers: {codes}")
    assert "every candidate within bounds" in passed.group(0)
    assert set(codes) == {200}
