"""Router overhead: the same wrk load on one variant's server, directly and through the router.

Run from the repository root:  .venv/bin/python -m bench.router_bench [--duration-s 10]

One `modeldeploy-server serve` (iris logistic regression) pinned to CPU 1 and one
`modeldeploy-server route` (100% to that server) pinned to CPU 0; wrk is pinned to CPU 0 in both
runs, so the server has a core to itself and the router shares its core with the load generator.
Prints a Markdown table and writes bench/results/router.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tests.models import build_iris_logreg
from tests.processes import route, serve_model

MODEL = "iris"
INFER = f"/v2/models/{MODEL}/infer"
BODY = json.dumps(
    {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
)
SERVER_CPU, ROUTER_CPU, WRK_CPU = "1", "0", "0"
RESULTS = Path(__file__).parent / "results" / "router.json"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput and latency in milliseconds."""

    connections: int
    requests_per_s: float
    mean_ms: float
    p50_ms: float
    p99_ms: float


def run_wrk(url: str, connections: int, duration_s: int, script: Path) -> WrkResult:
    """Run wrk on one thread against `url` and parse its summary; fail on any error response."""
    command = ["taskset", "-c", WRK_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s"]
    command += ["--latency", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw failed requests:\n{output}")

    def millis(pattern: str) -> float:
        match = re.search(pattern + r"\s+([\d.]+)(us|ms|s)\b", output)
        if match is None:
            raise RuntimeError(f"no {pattern!r} in wrk output:\n{output}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{output}")
    return WrkResult(
        connections=connections,
        requests_per_s=float(rate.group(1)),
        mean_ms=millis(r"Latency"),
        p50_ms=millis(r"50%"),
        p99_ms=millis(r"99%"),
    )


def main(argv: list[str]) -> int:
    """Measure direct and routed runs at each concurrency and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("wrk and taskset are needed (apt-get install wrk util-linux)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        script = workdir / "infer.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(BODY)}\n"
            'wrk.headers["content-type"] = "application/json"\n'
        )
        model = build_iris_logreg(workdir)
        pin = ["taskset", "-c", SERVER_CPU]
        with serve_model(model.path, MODEL, "v1", prefix=pin) as server:
            config = workdir / "routes.json"
            config.write_text(
                json.dumps(
                    {"model": MODEL, "variants": [{"name": "v1", "url": server.url, "weight": 100}]}
                )
            )
            with route(config, prefix=["taskset", "-c", ROUTER_CPU]) as router:
                check = httpx.post(router.url + INFER, content=BODY)
                check.raise_for_status()
                assert check.headers["x-model-variant"] == "v1"
                rows = []
                for connections in args.connections:
                    # A short warm-up, so both sides have their connection pools open.
                    for target in (server.url, router.url):
                        run_wrk(target + INFER, connections, 2, script)
                    direct = run_wrk(server.url + INFER, connections, args.duration_s, script)
                    routed = run_wrk(router.url + INFER, connections, args.duration_s, script)
                    rows.append({"direct": asdict(direct), "routed": asdict(routed)})
    # The machine is shared: a busy neighbour shows here and makes the run worth repeating.
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {os.getloadavg()}")
    print(
        "| connections | direct req/s | routed req/s | throughput ratio "
        "| direct p50/p99 ms | routed p50/p99 ms | added mean latency ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        d, r = row["direct"], row["routed"]
        print(
            f"| {d['connections']} | {d['requests_per_s']:.0f} | {r['requests_per_s']:.0f} "
            f"| {r['requests_per_s'] / d['requests_per_s']:.2f} "
            f"| {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} "
            f"| {r['mean_ms'] - d['mean_ms']:.2f} |"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"duration_s": args.duration_s, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
