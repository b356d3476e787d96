"""Inference server benchmark: modeldeploy vs a naive Starlette endpoint vs raw onnxruntime.

One command (from the repository root):

    .venv/bin/python bench/server_bench.py [--duration 5] [--out bench/results/server.json]

Builds the iris logistic regression (small) and the digits MLP (medium) with tests/models.py,
then for each model, request size (1 and 64 rows) and wrk concurrency (1, 16, 64) measures
req/s, rows/s, p50 and p99. Servers are pinned to CPU 0 and wrk to CPU 1 (taskset); raw
onnxruntime runs in this process, pinned to CPU 0, on ready numpy arrays (a ceiling, no HTTP).
Needs a quiet 2-core machine to mean anything: it prints the load average first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.models import BuiltModel, build_digits_mlp, build_iris_logreg  # noqa: E402
from tests.processes import free_port, serve_model  # noqa: E402

SERVER_CPU = "0"
CLIENT_CPU = "1"
CONCURRENCIES = (1, 16, 64)
ROW_COUNTS = (1, 64)
LUA = REPO / "bench" / "post.lua"
PACED_LUA = REPO / "bench" / "paced.lua"


def v2_body(features: np.ndarray[Any, Any], rows: int) -> bytes:
    """A v2 JSON request with `rows` distinct rows of the data set."""
    batch = np.asarray(features[:rows], dtype=np.float32)
    document = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(batch.shape),
                "data": batch.ravel().tolist(),
            }
        ]
    }
    return json.dumps(document).encode()


def run_wrk(
    url: str, body_path: Path, connections: int, duration_s: float, pause_ms: float = 0
) -> dict[str, Any]:
    """One wrk run on CPU 1; returns its JSON summary. With `pause_ms`, each connection waits
    that long after every answer (bench/paced.lua): a load below saturation."""
    seconds = max(1, round(duration_s))
    script = str(PACED_LUA if pause_ms else LUA)
    command = [
        "taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--timeout", "5s", "-s", script, url, "--", str(body_path), "application/json",
        *([str(pause_ms)] if pause_ms else []),
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    summary: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return summary


def measure_server(
    label: str, url: str, bodies: dict[int, Path], duration_s: float
) -> list[dict[str, Any]]:
    """Warm up, then every (rows, concurrency) cell against one server."""
    run_wrk(url, bodies[1], 16, 1)
    cells = []
    for rows, body in bodies.items():
        for connections in CONCURRENCIES:
            stats = run_wrk(url, body, connections, duration_s)
            seconds = stats["duration_us"] / 1e6
            cells.append(
                {
                    "target": label,
                    "rows": rows,
                    "concurrency": connections,
                    "req_s": stats["requests"] / seconds,
                    "rows_s": stats["requests"] * rows / seconds,
                    "p50_ms": stats["p50_us"] / 1000,
                    "p99_ms": stats["p99_us"] / 1000,
                    "bad": stats["non2xx"] + stats["errors"],
                }
            )
            print(json.dumps(cells[-1]), flush=True)
    return cells


def measure_raw(model: BuiltModel, duration_s: float) -> list[dict[str, Any]]:
    """session.run in a loop on CPU 0: the ceiling with no HTTP, JSON or Python web stack."""
    import onnxruntime as ort

    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(SERVER_CPU)})
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model.path), options)
        cells = []
        for rows in ROW_COUNTS:
            feed = {"input": np.asarray(model.features[:rows], dtype=np.float32)}
            latencies = []
            deadline = time.perf_counter() + duration_s
            while (started := time.perf_counter()) < deadline:
                session.run(None, feed)
                latencies.append(time.perf_counter() - started)
            per_s = len(latencies) / sum(latencies)
            quantiles = statistics.quantiles(latencies, n=100)
            cells.append(
                {
                    "target": "raw onnxruntime",
                    "rows": rows,
                    "concurrency": 1,
                    "req_s": per_s,
                    "rows_s": per_s * rows,
                    "p50_ms": quantiles[49] * 1000,
                    "p99_ms": quantiles[98] * 1000,
                    "bad": 0,
                }
            )
            print(json.dumps(cells[-1]), flush=True)
        return cells
    finally:
        os.sched_setaffinity(0, affinity)


@contextlib.contextmanager
def naive_server(model: BuiltModel, body: Path) -> Iterator[str]:
    """The naive endpoint under plain `uvicorn` defaults, pinned to CPU 0."""
    port = free_port()
    command = [
        "taskset", "-c", SERVER_CPU, sys.executable, "-m", "uvicorn", "naive_server:app",
        "--app-dir", str(REPO / "bench"), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "NAIVE_MODEL_PATH": str(model.path)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v2/models/m/infer"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.post(url, content=body.read_bytes(), timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"naive server did not start: {process.stderr}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def summarize(cells: list[dict[str, Any]]) -> str:
    """The markdown table plus the target ratios."""
    lines = [
        "| model | rows/req | conc | target | req/s | rows/s | p50 ms | p99 ms | non-2xx/errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        lines.append(
            f"| {cell['model']} | {cell['rows']} | {cell['concurrency']} | {cell['target']} "
            f"| {cell['req_s']:,.0f} | {cell['rows_s']:,.0f} | {cell['p50_ms']:.2f} "
            f"| {cell['p99_ms']:.2f} | {cell['bad']} |"
        )

    def find(model: str, target: str, rows: int, concurrency: int) -> dict[str, Any]:
        return next(
            c
            for c in cells
            if (c["model"], c["target"], c["rows"], c["concurrency"])
            == (model, target, rows, concurrency)
        )

    lines.append("")
    for model in sorted({c["model"] for c in cells}):
        ours = find(model, "modeldeploy", 1, 16)["req_s"]
        naive = find(model, "naive starlette", 1, 16)["req_s"]
        lines.append(
            f"- {model}: single-row req/s at c=16: {ours / naive:.2f}x naive (target 2.5x)"
        )
        best = max(find(model, "modeldeploy", 64, c)["rows_s"] for c in CONCURRENCIES)
        best_naive = max(find(model, "naive starlette", 64, c)["rows_s"] for c in CONCURRENCIES)
        lines.append(
            f"- {model}: 64-row rows/s, best concurrency: {best / best_naive:.2f}x naive "
            "(target 3x)"
        )
        for rows in ROW_COUNTS:
            p99 = find(model, "modeldeploy", rows, 64)["p99_ms"]
            lines.append(f"- {model}: p99 at c=64, {rows} row(s)/req: {p99:.2f} ms")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "server.json")
    parser.add_argument("--models", default="iris,mlp", help="comma-separated: iris, mlp")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("needs wrk and taskset", file=sys.stderr)
        return 2
    print(f"load average: {os.getloadavg()}", flush=True)
    builders = {"iris": build_iris_logreg, "mlp": build_digits_mlp}
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        for name in args.models.split(","):
            model = builders[name](directory)
            bodies = {}
            for rows in ROW_COUNTS:
                bodies[rows] = directory / f"{name}-{rows}.json"
                bodies[rows].write_bytes(v2_body(model.features, rows))
            found = [{"model": name, **c} for c in measure_raw(model, args.duration)]
            with serve_model(
                model.path,
                name,
                extra_args=["--intra-op-threads", "1"],
                prefix=["taskset", "-c", SERVER_CPU],
            ) as server:
                url = f"{server.url}/v2/models/{name}/infer"
                cells_ours = measure_server("modeldeploy", url, bodies, args.duration)
                found += [{"model": name, **c} for c in cells_ours]
            with naive_server(model, bodies[1]) as url:
                found += [
                    {"model": name, **c}
                    for c in measure_server("naive starlette", url, bodies, args.duration)
                ]
            cells += found
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(cells, indent=1))
    table = summarize(cells)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
