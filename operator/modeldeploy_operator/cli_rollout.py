"""`modeldeploy rollout status|pause|resume|promote|abort NAME`: read `status.rollout`, or give the
operator a command by the annotation it reads (exactly what
`kubectl annotate --overwrite modeldeployment/NAME modeldeploy.dev/rollout-command=pause@<time>`
does), then wait for the operator to acknowledge it in `status.rollout.command`."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from modeldeploy_operator.cli_kube import (
    KubeconfigError,
    ModelDeployments,
    RequestError,
    connect,
    default_kubeconfig,
)
from modeldeploy_operator.rollout import COMMANDS
from modeldeploy_operator.rollout_control import COMMAND_ANNOTATION

POLL_S = 0.5


def add_parser(commands: Any) -> None:
    """The `rollout` subcommand on the CLI's subparsers."""
    parser = commands.add_parser(
        "rollout",
        help="show or steer a ModelDeployment's rollout in the cluster",
        description="status: print status.rollout. pause, resume, promote, abort: set the "
        f"annotation {COMMAND_ANNOTATION} (as kubectl annotate does) and wait for the "
        "operator to acknowledge it.",
    )
    parser.add_argument("action", choices=("status", *COMMANDS))
    parser.add_argument("name", help="the ModelDeployment")
    parser.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    parser.add_argument("--kubeconfig", type=Path, help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument(
        "--wait-s",
        type=float,
        default=30.0,
        help="how long to wait for the operator's acknowledgement (0: do not wait; default 30)",
    )
    parser.set_defaults(rollout=True)


def main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run one `modeldeploy rollout` command; exit 1 when it cannot be done or acknowledged."""
    try:
        connection = connect(args.kubeconfig or default_kubeconfig(os.environ), args.context)
    except (KubeconfigError, OSError, ValueError) as error:
        print(f"modeldeploy rollout: {error}", file=err)
        return 1
    api = ModelDeployments(connection, args.namespace)
    try:
        if args.action == "status":
            out.write(describe(api.get(args.name)))
            return 0
        return command(api, args.name, args.action, args.wait_s, out, err)
    except RequestError as error:
        print(f"modeldeploy rollout: {error}", file=err)
        return 1
    finally:
        api.close()


def command(
    api: ModelDeployments,
    name: str,
    action: str,
    wait_s: float,
    out: TextIO,
    err: TextIO,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Annotate, then wait for `status.rollout.command` to say the operator handled it."""
    value = f"{action}@{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"
    api.annotate(name, COMMAND_ANNOTATION, value)
    print(f"{api.namespace}/{name}: {COMMAND_ANNOTATION}={value}", file=out)
    if wait_s <= 0:
        return 0
    deadline = clock() + wait_s
    while True:
        obj = api.get(name)
        rollout = obj.get("status", {}).get("rollout") or {}
        if rollout.get("command") == value:
            out.write(describe(obj))
            return 0
        if clock() >= deadline:
            print(
                f"{api.namespace}/{name}: the operator did not acknowledge {action} within "
                f"{wait_s:g} s (does the spec have a rollout? is the operator running?)",
                file=err,
            )
            return 1
        time.sleep(POLL_S)


def describe(obj: Mapping[str, Any]) -> str:
    """status.rollout in a few lines."""
    meta = obj.get("metadata", {})
    rollout = obj.get("status", {}).get("rollout")
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    if not rollout:
        return f"{where}: no rollout (the spec has no rollout, or the operator has not seen it)\n"

    def show(weights: Mapping[str, Any]) -> str:
        return ",".join(f"{k}={v}" for k, v in weights.items())

    lines = [
        f"{where}: {rollout.get('phase')} (generation {rollout.get('generation')}, "
        f"step {int(rollout.get('step', 0)) + 1})",
        f"  weights:        {show(rollout.get('weights', {}))}",
        f"  stable weights: {show(rollout.get('stableWeights', {}))}",
        f"  step since:     {rollout.get('stepStartedAt')}",
        f"  last decision:  {rollout.get('reason')}: {rollout.get('message')}",
    ]
    for entry in rollout.get("history", [])[-5:]:
        lines.append(
            f"  {entry.get('time')} step {int(entry.get('step', 0)) + 1} {entry.get('action')}: "
            f"{show(entry.get('weights', {}))}"
        )
    return "\n".join(lines) + "\n"
