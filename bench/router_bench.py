"""Router overhead: the same wrk load on one variant's server, directly and through the router.

One command (from the repository root):

    .venv/bin/python bench/router_bench.py [--duration 10] [--out bench/results/router.json]

One `modeldeploy-server serve` (iris logistic regression, 1-row v2 requests) pinned to CPU 0 and
one `modeldeploy-server route` (100% to that server) pinned to CPU 1, next to wrk, as in
bench/server_bench.py (whose wrk runner this reuses): the server has a core to itself in both runs,
and the router's cost shows as the difference. Each concurrency runs direct then routed, back to
back. Needs a quiet machine to mean anything: it prints the load average before and after.

Then, shadow traffic: a second server (variant v2, weight 0, the same model) gets a copy of
`--shadow-percent` of the requests. It runs on CPU 0 at SCHED_IDLE, so it only takes CPU the
primary server leaves idle (in a cluster it has pods of its own). Two routers, without and with
the shadow, take turns (3 runs each) under a paced load: 16 connections, each pausing
`--shadow-pause-ms` after every answer, below saturation, so the users' p50/p99 compare latency
rather than queueing; then each runs once at full speed (req/s, router CPU per request).
The router's shadow worker runs on the router's core (as in its pod); `--shadow-worker-cpu server`
moves it to the primary server's core, beside the shadow server, to tell its CPU's share of the
users' latency from the router's own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_bench import CLIENT_CPU, SERVER_CPU, run_wrk, v2_body  # noqa: E402
from tests.models import build_iris_logreg  # noqa: E402
from tests.processes import route, serve_model  # noqa: E402

MODEL = "iris"
INFER = f"/v2/models/{MODEL}/infer"
CONCURRENCIES = (1, 16, 64)
# Paced runs without and with the shadow, alternated this many times each.


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wakeups(pid: int) -> int:
    """Times the process's main thread (its event loop) went to sleep and was woken again."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise RuntimeError(f"no voluntary_ctxt_switches for process {pid}")


def measure(
    url: str,
    body: Path,
    connections: int,
    duration_s: float,
    pids: dict[str, int],
    pause_ms: float = 0,
) -> dict[str, float]:
    """One wrk run, with the CPU time and the wake-ups per request of each process in `pids`;
    fails on errors.

    CPU per request moves less than req/s and latency when a neighbour takes CPU; wake-ups per
    request say how often the process slept and was woken for the requests' events.
    """
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    woken = {name: wakeups(pid) for name, pid in pids.items()}
    stats = run_wrk(url, body, connections, duration_s, pause_ms)
    if stats["non2xx"] or stats["errors"]:
        raise RuntimeError(f"{url}: {stats['non2xx']} non-2xx, {stats['errors']} socket errors")
    result = {
        "req_s": stats["requests"] / (stats["duration_us"] / 1e6),
        "p50_ms": stats["p50_us"] / 1000,
        "p99_ms": stats["p99_us"] / 1000,
    }
    for name, pid in pids.items():
        result[f"{name}_cpu_us"] = (cpu_seconds(pid) - before[name]) / stats["requests"] * 1e6
        result[f"{name}_wakeups"] = (wakeups(pid) - woken[name]) / stats["requests"]
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
    pause_ms: float,
    rounds: int,
    worker_cpu: str,
) -> dict[str, Any]:
    """Routed runs at 16 connections without and with a shadow variant on `percent`, paced (each
    connection pauses `pause_ms` after every answer), alternated `rounds` times; then once each
    at full speed.

    The shadow server runs on the primary server's core at SCHED_IDLE: it gets only the CPU the
    primary leaves unused, as it would have a node of its own in a cluster. The router's shadow
    worker (which sends the copies and compares the answers, also at SCHED_IDLE) inherits the
    router's core, shared with wrk, unless `worker_cpu` is "server": it then joins the shadow
    server on the primary's core, as if the router pod had a core to spare for it. Its CPU per
    request is measured apart.
    """
    pin_router = ["taskset", "-c", CLIENT_CPU]
    pin_shadow = ["taskset", "-c", SERVER_CPU, "chrt", "--idle", "0"]
    result: dict[str, Any] = {
        "percent": percent,
        "connections": 16,
        "pause_ms": pause_ms,
        "rounds": rounds,
        "worker_cpu": worker_cpu,
    }
    with contextlib.ExitStack() as stack:
        shadow_server = stack.enter_context(
            serve_model(model_path, MODEL, "v2", ["--intra-op-threads", "1"], prefix=pin_shadow)
        )
        dark = [*variants, {"name": "v2", "url": shadow_server.url, "weight": 0}]
        routers = {}
        for name, extra in (
            ("unmirrored", {}),
            ("mirrored", {"shadow": {"variant": "v2", "percent": percent}}),
        ):
            path = config.with_name(f"routes-{name}.json")
            path.write_text(json.dumps({"model": MODEL, "variants": dark, **extra}))
            routers[name] = stack.enter_context(route(path, prefix=pin_router))
            run_wrk(routers[name].url + INFER, body, 16, 1)
        pids = {name: {"router": router.process.pid} for name, router in routers.items()}
        # The mirrored router started its shadow worker with the warm-up's first copy.
        (worker,) = psutil.Process(routers["mirrored"].process.pid).children()
        pids["mirrored"]["worker"] = worker.pid
        if worker_cpu == "server":
            worker.cpu_affinity([int(SERVER_CPU)])
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in routers}
        for round_ in range(rounds):
            for name in sorted(routers, reverse=round_ % 2 == 1):
                url = routers[name].url + INFER
                runs[name].append(measure(url, body, 16, duration_s, pids[name], pause_ms=pause_ms))
        for name, router in routers.items():
            result[name] = {
                "paced": runs[name],
                "p50_ms": statistics.median(run["p50_ms"] for run in runs[name]),
                "p99_ms": statistics.median(run["p99_ms"] for run in runs[name]),
                "full_speed": measure(router.url + INFER, body, 16, duration_s, pids[name]),
            }
        metrics = httpx.get(routers["mirrored"].url + "/metrics").text
        result["shadow_metrics"] = [
            line
            for line in metrics.splitlines()
            if line.startswith("modeldeploy_router_shadow_") and "_total" in line
        ]
    return result


def _median(runs: dict[str, Any], key: str) -> float:
    return statistics.median(run[key] for run in runs["paced"])


def summarize_shadow(shadow: dict[str, Any]) -> str:
    """Users' latency through the router without and with shadow copies."""
    plain, mirrored = shadow["unmirrored"], shadow["mirrored"]
    fast_plain, fast_mirrored = plain["full_speed"], mirrored["full_speed"]
    return (
        f"shadow {shadow['percent']}% at 16 connections, worker on the {shadow['worker_cpu']}'s "
        f"core, paced ({shadow['pause_ms']:g} ms pause, "
        f"median of {shadow['rounds']} runs each, {plain['paced'][0]['req_s']:.0f} req/s): "
        f"p50 {plain['p50_ms']:.2f} -> {mirrored['p50_ms']:.2f} ms, "
        f"p99 {plain['p99_ms']:.2f} -> {mirrored['p99_ms']:.2f} ms "
        f"({mirrored['p99_ms'] / plain['p99_ms']:.2f}x), router CPU "
        f"{_median(plain, 'router_cpu_us'):.0f} -> "
        f"{_median(mirrored, 'router_cpu_us'):.0f} us/req, "
        f"router wake-ups {_median(plain, 'router_wakeups'):.3f} -> "
        f"{_median(mirrored, 'router_wakeups'):.3f} per request, shadow worker CPU "
        f"{_median(mirrored, 'worker_cpu_us'):.0f} us/req; full speed: req/s "
        f"{fast_plain['req_s']:.0f} -> {fast_mirrored['req_s']:.0f}, p99 "
        f"{fast_plain['p99_ms']:.2f} -> {fast_mirrored['p99_ms']:.2f} ms, router CPU "
        f"{fast_plain['router_cpu_us']:.0f} -> {fast_mirrored['router_cpu_us']:.0f} us/req"
    )


def main(argv: list[str]) -> int:
    """Measure direct and routed runs at each concurrency; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "router.json")
    parser.add_argument(
        "--connections",
        type=int,
        nargs="*",
        default=list(CONCURRENCIES),
        help="concurrencies of the direct/routed table (none: only the shadow runs)",
    )
    parser.add_argument("--shadow-percent", type=int, default=10, help="0: no shadow runs")
    parser.add_argument(
        "--shadow-pause-ms",
        type=float,
        default=4.0,
        help="pause of each connection after every answer in the paced shadow runs",
    )
    parser.add_argument(
        "--shadow-rounds", type=int, default=5, help="paced runs of each router, alternated"
    )
    parser.add_argument(
        "--shadow-worker-cpu",
        choices=("router", "server"),
        default="router",
        help="the shadow worker's core: the router's (as in its pod) or the primary server's",
    )
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
                for connections in args.connections:
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
                    model.path,
                    body,
                    config,
                    variants,
                    args.shadow_percent,
                    args.duration,
                    args.shadow_pause_ms,
                    args.shadow_rounds,
                    args.shadow_worker_cpu,
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
