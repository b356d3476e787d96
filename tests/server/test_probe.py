"""`modeldeploy-server probe` through a real router to real servers on loopback: every probe is
pinned to a variant, the variants take turns on the same rows, and the router and the servers
count the probes apart from users' requests (the rollout reads users' and probes' numbers
separately; users' dashboards never see probes)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import httpx
import orjson

from modeldeploy_operator.rollout_metrics import parse_router_counters
from tests.models import BuiltModel, build_iris_stump
from tests.processes import RunningProcess, route, serve_model, server_command

USER_REQUEST = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


PROBE_TOKEN = "3f1c0de5a1b2c3d4e5f60718293a4b5c"


def test_probes_are_pinned_paced_and_counted_apart(
    iris: BuiltModel, iris_server: RunningProcess, tmp_path: Path
) -> None:
    stump = build_iris_stump(tmp_path)
    rows = [",".join(str(float(v)) for v in row) for row in iris.features[:7]]
    dataset = tmp_path / "golden.csv"
    dataset.write_text("\n".join(["a,b,c,d", *rows]) + "\n")
    sha = hashlib.sha256(dataset.read_bytes()).hexdigest()
    with serve_model(stump.path, "iris") as candidate:
        routes = tmp_path / "routes.json"
        variants = [
            {"name": "v1", "url": iris_server.url, "weight": 100},
            {"name": "v2", "url": candidate.url, "weight": 0},  # no user traffic
        ]
        routes.write_text(
            json.dumps({"model": "iris", "variants": variants, "probeToken": PROBE_TOKEN})
        )
        with route(routes) as router:
            infer = f"{router.url}/v2/models/iris/infer"
            users = [httpx.post(infer, json=USER_REQUEST) for _ in range(2)]
            # Users who send the probe header without the routes' token are users still.
            for spoofed in ("1", PROBE_TOKEN[:-1] + "x", ""):
                headers = {"x-modeldeploy-probe": spoofed}
                users.append(httpx.post(infer, json=USER_REQUEST, headers=headers))
            assert [answer.status_code for answer in users] == [200] * 5
            probe = subprocess.run(
                [
                    *server_command(),
                    "probe",
                    "--dataset",
                    str(dataset),
                    "--sha256",
                    sha,
                    "--url",
                    router.url,
                    "--model-name",
                    "iris",
                    "--variant",
                    "v1",
                    "--variant",
                    "v2",
                    "--rate",
                    "20",
                    "--duration-s",
                    "1",
                    "--probe-token",
                    PROBE_TOKEN,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            counters = parse_router_counters(httpx.get(f"{router.url}/metrics").text)
        served = httpx.get(f"{candidate.url}/metrics").text
    assert probe.returncode == 0, probe.stderr
    counts = orjson.loads(probe.stdout)
    # At most rate x duration requests in all, the variants taking turns.
    sent = {name: sum(c.values()) for name, c in counts.items()}
    assert 0 < sum(sent.values()) <= 20 and abs(sent["v1"] - sent["v2"]) <= 1
    assert {name: c["answered"] for name, c in counts.items()} == sent
    # Users' counters hold the users' requests only; the probes are counted apart, per variant.
    assert (counters["v1"].requests, counters["v2"].requests) == (5, 0)
    for name in ("v1", "v2"):
        probes = counters[name].probes
        assert probes is not None and (probes.requests, probes.errors) == (sent[name], 0)
    # The candidate's server (only probes reached it) counts them apart too.
    probe_counts = [
        float(line.rsplit(" ", 1)[1])
        for line in served.splitlines()
        if line.startswith("modeldeploy_probe_requests_total{")
    ]
    assert sum(probe_counts) == sent["v2"]
    assert "\nmodeldeploy_requests_total{" not in served


def test_an_unreadable_dataset_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "none.csv"
    args = ["--dataset", str(missing), "--url", "http://127.0.0.1:9", "--model-name", "iris"]
    args += ["--variant", "v1", "--rate", "1", "--duration-s", "1", "--probe-token", PROBE_TOKEN]
    probe = subprocess.run(
        [*server_command(), "probe", *args], capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 2 and "error" in probe.stderr and "Traceback" not in probe.stderr
