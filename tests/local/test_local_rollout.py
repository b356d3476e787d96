"""`modeldeploy run` rolls out an edit of its YAML file as the operator would: the same plan, judged
on the local router's own /metrics, its steps written into the router's routes file."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.local.test_run import (
    EXAMPLE,
    FEATURES,
    START_TIMEOUT_S,
    _model_uri,
    expected,
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


def golden(tmp_path: Path, name: str, labels: list[int]) -> dict[str, Any]:
    """A gate on the iris rows with `labels` as the expected answers (all must agree)."""
    rows = iris_rows()
    lines = [",".join([*FEATURES, "expected.label"])]
    lines += [
        ",".join([*map(str, row), str(label)]) for row, label in zip(rows, labels, strict=True)
    ]
    path = tmp_path / f"{name}.csv"
    path.write_text("\n".join(lines) + "\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"dataset": {"uri": path.as_uri(), "sha256": digest}, "outputs": ["label"]}


def test_gates_and_probes_run_locally_as_a_cluster_runs_their_jobs(tmp_path: Path) -> None:
    """No user at all: v2's gate runs as a local process (failing on wrong expected labels, so
    v2 gets no weight; passing once the dataset holds what v2 answers), then the steps are
    decided on probe traffic sent through the local router."""
    labels, _ = expected("v2", iris_rows())
    wrong = golden(tmp_path, "wrong", [(label + 1) % 3 for label in labels])
    right = golden(tmp_path, "right", labels)

    def gated(v1: int, v2: int, gate: dict[str, Any]) -> dict[str, Any]:
        obj = manifest(v1, v2)
        obj["spec"]["variants"][1]["gate"] = gate
        obj["spec"]["rollout"]["steps"] = [{"percent": 50, "holdSeconds": 10}]
        obj["spec"]["rollout"]["probes"] = {"requestsPerSecond": 20}
        return obj

    path = write_manifest(gated(100, 0, wrong), tmp_path)
    run = start_run(path, tmp_path)
    try:
        run.wait_for_line(r"^Ready: iris", START_TIMEOUT_S)
        run.wait_for_line(r"gate v2: gate FAILED: 0/150 rows agree", 120)
        path.write_text(yaml.safe_dump(gated(0, 100, wrong)))
        run.wait_for_line(r"edit: generation 2", 60)
        run.wait_for_line(r"rollout GateFailed: variant v2", 60)
        path.write_text(yaml.safe_dump(gated(0, 100, right)))
        run.wait_for_line(r"edit: generation 3", 60)
        run.wait_for_line(r"gate v2: gate passed: 150/150 rows agree", 120)
        run.wait_for_line(r"routes: v1=50,v2=50", 60)
        run.wait_for_line(r"rollout ProbesStarted: v2 behind the pace", 60)
        passed = run.wait_for_line(r"rollout StepPassed: .*", 120)
        run.wait_for_line(r"rollout Promoted: all 1 steps passed", 60)
        run.wait_for_line(r"routes: v1=0,v2=100", 60)
        metrics = httpx.get(f"{run.url}/metrics", timeout=10).text
    finally:
        stop_run(run)
    output = run.output()
    print(f"\n{output}")
    assert "every candidate within bounds" in passed.group(0)
    # v2 had no weight before its gate passed.
    lines = output.splitlines()
    first_weight = next(i for i, line in enumerate(lines) if "routes: v1=50,v2=50" in line)
    passed_at = next(i for i, line in enumerate(lines) if "gate v2: gate passed" in line)
    assert passed_at < first_weight
    # No user request: only probes were answered, counted apart.
    assert 'modeldeploy_router_requests_total{code="200"' not in metrics
    assert 'modeldeploy_router_probe_requests_total{code="200",variant="v2"}' in metrics
