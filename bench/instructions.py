"""Server or router cost in CPU instructions per request: a measure a busy machine does not move.

One command (from the repository root; needs valgrind):

    .venv/bin/python bench/instructions.py router [--requests 2000] [--shadow-percent 0]
    .venv/bin/python bench/instructions.py server [--requests 2000]
    PYTHONPATH=<checkout>/server .venv/bin/python bench/instructions.py server   # other code

`router`: one `modeldeploy-server serve` (iris, 1-row v2 requests) and one `modeldeploy-server
route` in front of it under callgrind; `server`: the `serve` process itself under callgrind. With
instrumentation off at first, 400 warm-up requests go over `--connections` (16) keep-alive
connections, then instrumentation is switched on for `--requests` more and the measured process's
user-space instructions (Python, uvloop, httptools, onnxruntime; not the kernel's side of its
syscalls) are divided by their count. CPU time per request (bench/router_bench.py) moves 2x with
the neighbours' load on a shared machine; this count moves by well under 1% from run to run for
the router, 1-2% for the server (how many requests share a model run varies). With
`--shadow-percent`, the router mirrors that share of the requests to a second variant (weight 0,
the same server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.server_bench import v2_body  # noqa: E402
from tests.models import build_iris_logreg  # noqa: E402
from tests.processes import RunOptions, route, serve_model  # noqa: E402

MODEL = "iris"
INFER = f"/v2/models/{MODEL}/infer"
WARM_UP_REQUESTS = 400


async def send_requests(port: int, body: bytes, count: int, connections: int) -> None:
    """`count` requests over `connections` keep-alive connections, each answer checked."""
    request = (
        f"POST {INFER} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def one_connection(requests: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(requests):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"unexpected answer: {head!r}")
            length = next(
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            await reader.readexactly(length)
        writer.close()

    await asyncio.gather(*(one_connection(count // connections) for _ in range(connections)))


def instructions(dump: Path) -> int:
    """Total `Ir` of a callgrind output file (self costs; call lines carry inclusive ones)."""
    total, after_call = 0, False
    for line in dump.read_text().splitlines():
        if line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            if len(fields) >= 2:
                if not after_call:
                    total += int(fields[1])
                after_call = False
    return total


def measure(port: int, pid: int, body: bytes, count: int, connections: int) -> None:
    """Warm up, then send `count` requests with callgrind's instrumentation of `pid` on."""
    asyncio.run(send_requests(port, body, WARM_UP_REQUESTS, connections))
    control = ["callgrind_control", "--instr=on", str(pid)]
    subprocess.run(control, check=True, capture_output=True)
    asyncio.run(send_requests(port, body, count, connections))
    for step in ("--instr=off", "--dump"):
        control[1] = step
        subprocess.run(control, check=True, capture_output=True)


def main(argv: list[str]) -> int:
    """Measure and print the server's or the router's instructions per request."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("process", choices=["server", "router"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--shadow-percent", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="a folder to copy callgrind's output files to")
    args = parser.parse_args(argv)
    count = args.requests - args.requests % args.connections
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = build_iris_logreg(workdir)
        body = v2_body(model.features, 1)
        config = workdir / "routes.json"
        dump = workdir / "callgrind.out"
        valgrind = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={dump}",
        ]  # fmt: skip
        # Under valgrind a process starts in tens of seconds.
        measured: RunOptions = {"prefix": valgrind, "ready_timeout_s": 600.0}
        serve_options: RunOptions = measured if args.process == "server" else {}
        serve_args = ["--intra-op-threads", "1"]
        with serve_model(model.path, MODEL, "v1", serve_args, **serve_options) as server:
            if args.process == "server":
                measure(server.port, server.process.pid, body, count, args.connections)
            else:
                variants = [{"name": "v1", "url": server.url, "weight": 100}]
                routes: dict[str, object] = {"model": MODEL, "variants": variants}
                if args.shadow_percent:
                    variants.append({"name": "v2", "url": server.url, "weight": 0})
                    routes["shadow"] = {"variant": "v2", "percent": args.shadow_percent}
                config.write_text(json.dumps(routes))
                with route(config, **measured) as router:
                    measure(router.port, router.process.pid, body, count, args.connections)
            dumps = sorted(workdir.glob("callgrind.out*"))
            total = sum(instructions(path) for path in dumps)
            for path in dumps if args.keep else ():
                shutil.copy(path, args.keep)
    code = os.environ.get("PYTHONPATH") or "this checkout"
    shadow = f", {args.shadow_percent}% mirrored" if args.shadow_percent else ""
    print(f"{args.process} ({code}): {total / count:,.0f} instructions per request", end=" ")
    print(f"({count} requests on {args.connections} connections{shadow})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
