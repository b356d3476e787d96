"""Router overhead: the same wrk load on one variant's server, directly and through the router.

One command (from the repository root):

    .venv/bin/python bench/router_bench.py [--duration 10] [--out bench/results/router.json]

One `modeldeploy-server serve` (iris logistic regression, 1-row v2 requests) pinned to CPU 0 and
one `modeldeploy-server route` (100% to that server) pinned to CPU 1, next to wrk, as in
bench/server_bench.py (whose wrk runner this reuses): the server has a core to itself in both runs,
and the router's cost shows as the difference. Each concurrency runs direct then routed, back to
back. Needs a quiet machine to mean anything: it prints the load average before and after.

Then, shadow traffic: a second server (variant v2, weight 0, the same model, also on CPU 0) gets
a copy of `--shadow-percent` of the requests, and the routed run at 16 connections is repeated
without and with the shadow, back to back, to compare the users' p50/p99.
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


def measure_shadow(
    model_path: Path,
    body: Path,
    config: Path,
    variants: list[dict[str, Any]],
    percent: int,
    duration_s: float,
) -> dict[str, Any]:
    """Routed runs at 16 connections without, then with, a shadow variant on `percent`."""
    pin_server, pin_router = ["taskset", "-c", SERVER_CPU], ["taskset", "-c", CLIENT_CPU]
    result: dict[str, Any] = {"percent": percent, "connections": 16}
    with serve_model(
        model_path, MODEL, "v2", ["--intra-op-threads", "1"], prefix=pin_server
    ) as shadow_server:
        dark = [*variants, {"name": "v2", "url": shadow_server.url, "weight": 0}]
        for name, extra in (
            ("unmirrored", {}),
            ("mirrored", {"shadow": {"variant": "v2", "percent": percent}}),
        ):
            config.write_text(json.dumps({"model": MODEL, "variants": dark, **extra}))
            with route(config, prefix=pin_router) as router:
                run_wrk(router.url + INFER, body, 16, 1)
                result[name] = measure(
                    router.url + INFER, body, 16, duration_s, {"router": router.process.pid}
                )
                metrics = httpx.get(router.url + "/metrics").text
        result["shadow_metrics"] = [
            line
            for line in metrics.splitlines()
            if line.startswith("modeldeploy_router_shadow_") and "_total" in line
        ]
    return result


def summarize_shadow(shadow: dict[str, Any]) -> str:
    """Users' latency through the router without and with shadow copies."""
    plain, mirrored = shadow["unmirrored"], shadow["mirrored"]
    return (
        f"shadow {shadow['percent']}% at 16 connections: p50 {plain['p50_ms']:.2f} -> "
        f"{mirrored['p50_ms']:.2f} ms, p99 {plain['p99_ms']:.2f} -> {mirrored['p99_ms']:.2f} ms "
        f"({mirrored['p99_ms'] / plain['p99_ms']:.2f}x), req/s {plain['req_s']:.0f} -> "
        f"{mirrored['req_s']:.0f}, router CPU {plain['router_cpu_us']:.0f} -> "
        f"{mirrored['router_cpu_us']:.0f} us/req"
    )


def main(argv: list[str]) -> int:
    """Measure direct and routed runs at each concurrency; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "router.json")
    parser.add_argument("--shadow-percent", type=int, default=10, help="0: no shadow runs")
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
            if args.shadow_percent:
                shadow = measure_shadow(
                    model.path, body, config, variants, args.shadow_percent, args.duration
                )
                print(json.dumps({"shadow": shadow}), flush=True)
    # The machine is shared: a busy neighbour shows here and makes the run worth repeating.
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average after: {load['after']}")
    print(summarize(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.shadow_percent:
        print(summarize_shadow(shadow))
    document = {"duration_s": args.duration, "load": load, "runs": rows}
    if args.shadow_percent:
        document["shadow"] = shadow
    args.out.write_text(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
