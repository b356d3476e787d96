"""Router overhead: the same wrk load on one variant's server, directly and through the router.

One command (from the repository root):

    .venv/bin/python bench/router_bench.py [--duration 10] [--out bench/results/router.json]

One `modeldeploy-server serve` (iris logistic regression, 1-row v2 requests) pinned to CPU 0 and
one `modeldeploy-server route` (100% to that server) pinned to CPU 1, next to wrk, as in
bench/server_bench.py (whose wrk runner this reuses): the server has a core to itself in both runs,
and the router's cost shows as the difference. Each concurrency runs direct then routed, back to
back. Needs a quiet machine to mean anything: it prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_bench import CLIENT_CPU, SERVER_CPU, run_wrk, v2_body  # noqa: E402
from tests.models import build_iris_logreg  # noqa: E402
from tests.processes import route, serve_model  # noqa: E402

MODEL = "iris"
INFER = f"/v2/models/{MODEL}/infer"
CONCURRENCIES = (1, 16, 64)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    url: str, body: Path, connections: int, duration_s: float, pids: dict[str, int]
) -> dict[str, float]:
    """One wrk run, with the CPU time per request of each process in `pids`; fails on errors.

    CPU per request hardly moves when a neighbour takes CPU, unlike req/s and latency.
    """
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    stats = run_wrk(url, body, connections, duration_s)
    if stats["non2xx"] or stats["errors"]:
        raise RuntimeError(f"{url}: {stats['non2xx']} non-2xx, {stats['errors']} socket errors")
    result = {
        "req_s": stats["requests"] / (stats["duration_us"] / 1e6),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
    }
    for name, pid in pids.items():
        result[f"{name}_cpu_us"] = (cpu_seconds(pid) - before[name]) / stats["requests"] * 1e6
    return result


def summarize(rows: list[dict[str, Any]]) -> str:
    """The Markdown table for bench/README.md."""
    lines = [
        "| connections | direct req/s | routed req/s | routed/direct | direct p50 / p99 ms "
        "| routed p50 / p99 ms | added p50 ms | server CPU us/req | router CPU us/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d, r = row["direct"], row["routed"]
        lines.append(
            f"| {row['connections']} | {d['req_s']:.0f} | {r['req_s']:.0f} "
            f"| {r['req_s'] / d['req_s']:.2f} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} "
            f"| {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['p50_ms'] - d['p50_ms']:.2f} "
            f"| {d['server_cpu_us']:.0f} | {r['router_cpu_us']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Measure direct and routed runs at each concurrency; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "router.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = build_iris_logreg(workdir)
        body = workdir / "iris-1.json"
        body.write_bytes(v2_body(model.features, 1))
        config = workdir / "routes.json"
        pin_server, pin_router = ["taskset", "-c", SERVER_CPU], ["taskset", "-c", CLIENT_CPU]
        with serve_model(
            model.path, MODEL, "v1", ["--intra-op-threads", "1"], prefix=pin_server
        ) as server:
            variants = [{"name": "v1", "url": server.url, "weight": 100}]
            config.write_text(json.dumps({"model": MODEL, "variants": variants}))
            with route(config, prefix=pin_router) as router:
                check = httpx.post(router.url + INFER, content=body.read_bytes())
                check.raise_for_status()
                assert check.headers["x-model-variant"] == "v1", check.headers
                for target in (server.url, router.url):  # warm-up: pools open, code paths hot
                    run_wrk(target + INFER, body, 16, 1)
                for connections in CONCURRENCIES:
                    server_pid = {"server": server.process.pid}
                    both_pids = {**server_pid, "router": router.process.pid}
                    row = {
                        "connections": connections,
                        "direct": measure(
                            server.url + INFER, body, connections, args.duration, server_pid
                        ),
                        "routed": measure(
                            router.url + INFER, body, connections, args.duration, both_pids
                        ),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    # The machine is shared: a busy neighbour shows here and makes the run worth repeating.
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average after: {load['after']}")
    print(summarize(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"duration_s": args.duration, "load": load, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
