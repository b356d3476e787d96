"""`modeldeploy-server probe`: a rollout's probe traffic, for steps that natural traffic alone
would leave short of samples.

    modeldeploy-server probe --dataset golden.csv --sha256 HEX --url http://router:8080 \
        --model-name M --variant v1 --variant v2 --rate 10 --duration-s 60

Sends the dataset's rows (read as `gate` reads them, expected answers left aside) one row a
request to the router's records endpoint, each pinned to a variant by the override header and
marked with the probe header carrying the routes' `probeToken` (`--probe-token`, or
`$MODELDEPLOY_PROBE_TOKEN`), so the router counts them apart from users' requests
(`modeldeploy_router_probe_*`). The variants take turns on the same rows (like for like: the
candidate and the stable variants answer the same inputs), at most `--rate` requests a second in
all, for at most `--duration-s` seconds. A failed or refused request is counted, never retried:
the router's probe counters are what a rollout judges. Prints the counts as JSON; exit 0, or 2
when the dataset cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import httpx
import orjson

from modeldeploy_operator.contract import PROBE_TOKEN_ENV
from modeldeploy_server.gate import (
    Endpoint,
    GateError,
    add_dataset_arguments,
    dataset_format,
    fetch_dataset,
    parse_dataset_arguments,
    read_rows,
    records_url,
)
from modeldeploy_server.routing import DEFAULT_HEADER_OVERRIDE, PROBE_HEADER

PROGRAM = "modeldeploy-server probe"
MAX_RATE_PER_S = 100.0
MAX_DURATION_S = 86_400.0


@dataclass(frozen=True)
class ProbeConfig:
    """One probe run, validated."""

    dataset: str
    sha256: str | None
    file_format: str
    url: str  # the router's base URL
    model_name: str
    variants: tuple[str, ...]
    rate_per_s: float
    duration_s: float
    probe_token: str
    header_override: str = DEFAULT_HEADER_OVERRIDE
    timeout_s: float = 10.0


def run_probe(config: ProbeConfig, workdir: Path) -> dict[str, dict[str, int]]:
    """Send the probes; per variant, how many were answered, refused (a 4xx/5xx answer) and
    unanswered (no answer, or the router's 502/503/504)."""
    local, _ = fetch_dataset(config.dataset, config.sha256, workdir, config.timeout_s)
    inputs, rows = read_rows(local, config.file_format)
    budget = max(int(config.rate_per_s * config.duration_s), 1)
    # Each variant gets the same rows: at most budget / variants of them are ever sent.
    sample = list(islice(rows, -(-budget // len(config.variants))))
    if not sample:
        raise GateError(f"{config.dataset} has no data rows")
    counts = {v: {"answered": 0, "refused": 0, "unanswered": 0} for v in config.variants}
    url = records_url(config.url, config.model_name)
    started = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(config.timeout_s)) as client:
        endpoints = {
            variant: Endpoint(
                client,
                url,
                inputs,
                headers={config.header_override: variant, PROBE_HEADER: config.probe_token},
            )
            for variant in config.variants
        }
        for sent in range(budget):
            due = started + sent / config.rate_per_s
            if due - started >= config.duration_s:
                break
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            variant = config.variants[sent % len(config.variants)]
            row = sample[(sent // len(config.variants)) % len(sample)]
            try:
                answer = endpoints[variant].predict([row])
            except GateError:
                counts[variant]["unanswered"] += 1
                continue
            counts[variant]["refused" if isinstance(answer, str) else "answered"] += 1
    return counts


def _rate(value: str) -> float:
    number = float(value)
    if not 0 < number <= MAX_RATE_PER_S:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_RATE_PER_S:g}]")
    return number


def _duration(value: str) -> float:
    number = float(value)
    if not 0 < number <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_DURATION_S:g}]")
    return number


def parse_probe_config(argv: Sequence[str]) -> ProbeConfig:
    """The run's configuration (argparse exits with 2 on bad arguments)."""
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Send a rollout's probe traffic.")
    add_dataset_arguments(parser, "the router's base URL")
    parser.add_argument(
        "--variant", action="append", required=True, help="a variant to probe (repeatable)"
    )
    parser.add_argument("--rate", type=_rate, required=True, help="requests a second, in all")
    parser.add_argument("--duration-s", type=_duration, required=True, help="for at most (s)")
    parser.add_argument(
        "--header-override", default=DEFAULT_HEADER_OVERRIDE, help="the router's variant header"
    )
    token = os.environ.get(PROBE_TOKEN_ENV)
    parser.add_argument(
        "--probe-token",
        default=token,
        required=token is None,
        help=f"the routes' probeToken, sent in the probe header (default: ${PROBE_TOKEN_ENV})",
    )
    args = parse_dataset_arguments(parser, argv)
    return ProbeConfig(
        dataset=args.dataset,
        sha256=args.sha256,
        file_format=dataset_format(args.dataset, args.format),
        url=args.url,
        model_name=args.model_name,
        variants=tuple(dict.fromkeys(args.variant)),
        rate_per_s=args.rate,
        duration_s=args.duration_s,
        probe_token=args.probe_token,
        header_override=args.header_override,
    )


def main(argv: list[str]) -> int:
    """Entry point of `modeldeploy-server probe`: 0 sent, 2 could not read the dataset."""
    config = parse_probe_config(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="modeldeploy-probe-") as workdir:
            counts = run_probe(config, Path(workdir))
    except GateError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(orjson.dumps(counts, option=orjson.OPT_SORT_KEYS) + b"\n")
    return 0
