"""Hostile-client benchmarks of the HTTP edge (issue 10): one command per question, loopback only.

    .venv/bin/python bench/edge_bench.py goodput [--rounds 3]    # 500-row requests, c=64, c=1000
    .venv/bin/python bench/edge_bench.py rss                      # 150 near-limit bodies held
    .venv/bin/python bench/edge_bench.py headers [--duration 10]  # a client's p99 vs 8 huge headers
    .venv/bin/python bench/edge_bench.py sigterm                  # SIGTERM under c=32: dropped?
    .venv/bin/python bench/edge_bench.py table --base DIR         # 1-row iris c=16, base vs this

The server runs pinned to CPU 0 (`taskset -c 0`, `--intra-op-threads 1`), the load on CPU 1, as in
server_bench.py. Each prints the load average first: on a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_bench import CLIENT_CPU, SERVER_CPU, run_wrk, v2_body  # noqa: E402
from modeldeploy_operator.contract import SHUTDOWN_DELAY_S  # noqa: E402
from tests.models import BuiltModel, build_iris_logreg  # noqa: E402
from tests.processes import LOOPBACK, RunningProcess, serve_model  # noqa: E402

INFER = "/v2/models/iris/infer"
# How long after wrk starts the goodput's steady state is measured from.
GOODPUT_RAMP_S = 1.0
MIB = 1024 * 1024


@contextlib.contextmanager
def iris_server(
    model: BuiltModel, extra: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[RunningProcess]:
    with serve_model(
        model.path,
        "iris",
        extra_args=["--intra-op-threads", "1", *extra],
        prefix=["taskset", "-c", SERVER_CPU],
        env=env or {},
    ) as server:
        yield server


def _served(url: str) -> float:
    """The server's own count of inference requests answered 200 (its /metrics)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "modeldeploy_requests"
        for sample in family.samples
        if sample.name == "modeldeploy_requests_total" and sample.labels["code"] == "200"
    )


def goodput(model: BuiltModel, scratch: Path, duration_s: float, rounds: int) -> None:
    """Successful 500-row requests per second at c=64 and c=1000 (wrk, which retries at once),
    in alternating rounds. Steady state: the server's own count of 200s over `duration_s`,
    from GOODPUT_RAMP_S after wrk starts (wrk on one core takes about half a second to open
    1,000 connections and send their first bodies, during which the server waits for it). Also
    per second of the server's CPU: on a shared machine the neighbours take some of its core,
    and its busy share shows whether it ever starved."""
    body = scratch / "iris-500.json"
    features = model.features
    body.write_bytes(v2_body(features[[i % len(features) for i in range(500)]], 500))
    steady: dict[int, list[float]] = {64: [], 1000: []}
    per_cpu: dict[int, list[float]] = {64: [], 1000: []}
    whole: dict[int, list[float]] = {64: [], 1000: []}
    with iris_server(model) as server:
        process = psutil.Process(server.process.pid)
        run_wrk(server.url + INFER, body, 16, 1)
        for round_number, connections in itertools.product(range(1, rounds + 1), (64, 1000)):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                load = pool.submit(
                    run_wrk, server.url + INFER, body, connections, duration_s + 2 * GOODPUT_RAMP_S
                )
                time.sleep(GOODPUT_RAMP_S)
                first, cpu_first, started = _served(server.url), _cpu_s(process), time.monotonic()
                time.sleep(duration_s)
                last, cpu_last, ended = _served(server.url), _cpu_s(process), time.monotonic()
                wrk_stats = load.result()
            steady[connections].append((last - first) / (ended - started))
            per_cpu[connections].append((last - first) / (cpu_last - cpu_first))
            seconds = wrk_stats["duration_us"] / 1e6
            whole[connections].append((wrk_stats["requests"] - wrk_stats["non2xx"]) / seconds)
            print(
                f"round {round_number} c={connections}: {steady[connections][-1]:.0f} "
                f"successful req/s steady, {per_cpu[connections][-1]:.0f} per CPU-s, server busy "
                f"{(cpu_last - cpu_first) / (ended - started):.0%} (whole run by wrk: "
                f"{whole[connections][-1]:.0f}; {wrk_stats['requests']} answers, "
                f"{wrk_stats['non2xx']} non-2xx, {wrk_stats['errors']} socket errors, "
                f"p99 {wrk_stats['p99_us'] / 1000:.1f} ms)",
                flush=True,
            )

    def ratio(measure: dict[int, list[float]]) -> str:
        return f"{statistics.median(measure[1000]) / statistics.median(measure[64]):.0%}"

    pairs = zip(steady[1000], steady[64], strict=True)
    rounds_ratios = ", ".join(f"{high / low:.0%}" for high, low in pairs)
    print(f"goodput c=1000 / c=64 per round: {rounds_ratios}")
    print(
        f"medians of {rounds}: steady {ratio(steady)}, per CPU-s {ratio(per_cpu)} "
        f"(whole runs by wrk: {ratio(whole)}); target >= 80%"
    )


def _cpu_s(process: psutil.Process) -> float:
    """The process's CPU seconds so far (all its threads)."""
    times = process.cpu_times()
    return float(times.user + times.system)


def _hold_body(port: int, size: int, sent_all_but: int, hold: threading.Event) -> str:
    """Send a head declaring `size` bytes and all of the body but `sent_all_but`; wait."""
    with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
        head = (
            f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {size}\r\n\r\n"
        ).encode()
        try:
            sock.sendall(head)
            chunk = b"[" * MIB
            remaining = size - sent_all_but
            while remaining > 0:
                sent = sock.send(chunk[: min(remaining, MIB)])
                remaining -= sent
        except OSError:
            pass
        hold.wait(60)
        sock.settimeout(0.5)
        with contextlib.suppress(OSError):
            answer = sock.recv(200)
            return answer.split(b"\r\n", 1)[0].decode() or "closed"
        return "held"


def rss(model: BuiltModel) -> None:
    """RSS of the server while 150 connections each hold a body just under the 6 MiB limit."""
    with iris_server(model) as server:
        process = psutil.Process(server.process.pid)
        for _ in range(50):  # warm: a few ordinary requests
            httpx.post(server.url + INFER, content=v2_body(model.features, 8))
        baseline = process.memory_info().rss
        peak = baseline
        hold = threading.Event()
        size = 6 * MIB - 1024
        outcomes: list[str] = []
        threads = [
            threading.Thread(
                target=lambda: outcomes.append(_hold_body(server.port, size, 10, hold))
            )
            for _ in range(150)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)
        hold.set()
        for thread in threads:
            thread.join()
        time.sleep(2)
        after = process.memory_info().rss
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    print(f"150 connections, each a {size}-byte body short of 10 bytes: {counts}")
    print(
        f"RSS: {baseline / MIB:.0f} MiB before, peak {peak / MIB:.0f} MiB while held "
        f"(+{(peak - baseline) / MIB:.0f} MiB), {after / MIB:.0f} MiB 2 s after they closed"
    )


_ATTACKER = """
import socket, sys, time
port, until = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
head = b"POST /v2/models/iris/infer HTTP/1.1\\r\\nhost: x\\r\\nx-big: "
piece, refused = b"b" * 65536, 0
while time.monotonic() < until:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(head)
            for _ in range(2048):  # up to 128 MiB of one header
                sock.sendall(piece)
        except OSError:
            pass
        try:
            refused += sock.recv(100).startswith(b"HTTP/1.1 431")
        except OSError:
            pass
print(refused)
"""


def headers(model: BuiltModel, duration_s: float) -> None:
    """Latency of a normal keep-alive client while 8 connections send 128 MiB headers."""
    body = v2_body(model.features, 1)
    with iris_server(model) as server:
        command = ["taskset", "-c", CLIENT_CPU, sys.executable, "-c", _ATTACKER]
        arguments = [str(server.port), str(duration_s + 1)]
        attackers = [
            subprocess.Popen([*command, *arguments], stdout=subprocess.PIPE, text=True)
            for _ in range(8)
        ]
        time.sleep(1)
        latencies = []
        failures = 0
        with httpx.Client(timeout=10) as client:
            until = time.monotonic() + duration_s
            while time.monotonic() < until:
                started = time.perf_counter()
                answer = client.post(server.url + INFER, content=body)
                latencies.append(time.perf_counter() - started)
                failures += answer.status_code != 200
        refused = sum(int(a.communicate(timeout=60)[0] or 0) for a in attackers)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(
        f"normal client: {len(latencies)} requests, {failures} failed, "
        f"p50 {statistics.median(latencies) * 1000:.2f} ms, p99 {p99:.2f} ms, "
        f"max {latencies[-1] * 1000:.2f} ms (target p99 < 20 ms); "
        f"8 attackers were answered 431 {refused} times"
    )


async def _worker(
    port: int, body: bytes, counts: dict[str, int], stop: asyncio.Event, balancer: bool
) -> None:
    request = (
        f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while not stop.is_set():
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
            except OSError:  # refused: the request was never sent, a client may go elsewhere
                counts["connect refused (never sent)"] += 1
                if not balancer:
                    return
                await asyncio.sleep(0.01)
                continue
        assert reader is not None
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            counts["ok" if head.startswith(b"HTTP/1.1 200") else head[:12].decode()] += 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            counts["dropped (sent, no answer)"] += 1
            writer.close()
            writer = None
            if not balancer:
                return


async def _prober(url: str, stop: asyncio.Event) -> None:
    """Like an endpoints controller: once readiness fails, no new requests are sent."""
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/v2/health/ready")).status_code != 200:
                    stop.set()
            await asyncio.sleep(0.5)


async def _sigterm_run(server: RunningProcess, body: bytes, balancer: bool) -> dict[str, int]:
    counts: dict[str, int] = {
        "ok": 0, "dropped (sent, no answer)": 0, "connect refused (never sent)": 0
    }  # fmt: skip
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_worker(server.port, body, counts, stop, balancer)) for _ in range(32)
    ]
    if balancer:
        tasks.append(asyncio.create_task(_prober(server.url, stop)))
    await asyncio.sleep(3)
    server.process.send_signal(signal.SIGTERM)
    await asyncio.wait(tasks, timeout=30)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counts


def sigterm(model: BuiltModel) -> None:
    """c=32 keep-alive clients, SIGTERM after 3 s with the default shutdown delay."""
    body = v2_body(model.features, 1)
    # The test helper turns the delay off; the benchmark measures the default.
    default_delay = {"MODELDEPLOY_SHUTDOWN_DELAY_S": str(SHUTDOWN_DELAY_S)}
    for balancer in (True, False):
        with iris_server(model, env=default_delay) as server:
            counts = asyncio.run(_sigterm_run(server, body, balancer))
            code = server.process.wait(60)
        kind = (
            "clients behind a balancer (readiness probed every 0.5 s)"
            if balancer
            else "clients that ignore readiness until the port closes"
        )
        print(f"{kind}: {counts}, server exit {code}")


def table(model: BuiltModel, scratch: Path, base: Path, rounds: int, duration_s: float) -> None:
    """1-row iris at c=16, the base tree and this one alternately in one sitting."""
    body = scratch / "iris-1.json"
    body.write_bytes(v2_body(model.features, 1))
    trees = {"base": base.resolve(), "this": REPO}
    results: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, tree in trees.items():
            path = f"{tree / 'server'}{os.pathsep}{tree / 'operator'}"
            with iris_server(model, env={"PYTHONPATH": path}) as server:
                run_wrk(server.url + INFER, body, 16, 1)
                stats = run_wrk(server.url + INFER, body, 16, duration_s)
                results[name].append(stats["requests"] / (stats["duration_us"] / 1e6))
                print(f"{name}: {results[name][-1]:.0f} req/s", flush=True)
    base_rate, this_rate = (statistics.median(results[n]) for n in trees)
    print(
        f"median of {rounds}: base {base_rate:.0f} req/s, this {this_rate:.0f} req/s "
        f"({this_rate / base_rate - 1:+.1%}; target within -5%)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["goodput", "rss", "headers", "sigterm", "table"])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--base", type=Path, help="table: a checkout of the code to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="goodput, table: alternations")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        model = build_iris_logreg(scratch)
        if args.which == "goodput":
            goodput(model, scratch, args.duration, args.rounds)
        elif args.which == "rss":
            rss(model)
        elif args.which == "headers":
            headers(model, args.duration)
        elif args.which == "sigterm":
            sigterm(model)
        else:
            if args.base is None:
                parser.error("table needs --base")
            table(model, scratch, args.base, args.rounds, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
