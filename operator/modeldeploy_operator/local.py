"""Local mode's pure core: what `modeldeploy run` starts for one ModelDeployment on one machine.

Where each model is read from, the processes (one server per variant, one router) with their
arguments, what each Kubernetes-only field becomes locally, and the example requests shown to the
user. Starts nothing and reads neither the environment nor the clock: local_runner.py does that.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from modeldeploy_operator.render import (
    SHADOW_LOG_FILE,
    render_router_settings_env,
    render_routes_config,
    render_server_settings_env,
)
from modeldeploy_operator.spec import ModelDeployment, ModelSource, PodSettings

LOOPBACK = "127.0.0.1"
ROUTER_NAME = "router"
# A records instance (JSON object: input name -> value) to show in the example requests; without
# it they carry placeholder values, which any model accepts but which mean nothing.


@dataclass(frozen=True)
class LocalFile:
    """A model file already on this machine."""

    path: Path


@dataclass(frozen=True)
class Download:
    """A model to download once into the cache; the file name is its sha256, so a changed model
    never reuses a stale copy and two ModelDeployments share one."""

    url: str
    cache_path: Path


@dataclass(frozen=True)
class LocalProcess:
    """One process to start: a variant's server or the router."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to the runner's own environment
    url: str


@dataclass(frozen=True)
class LocalPlan:
    variants: tuple[LocalProcess, ...]
    router: LocalProcess
    routes: Mapping[str, Any]  # the router's routes.json


# Local mode stops every process at once and nothing balances load onto them: holding the port
# open after SIGTERM (for a balancer to notice) would only slow Ctrl-C down.
_NO_SHUTDOWN_DELAY = ("--shutdown-delay-s", "0")


def locate_model(
    source: ModelSource, *, base_dir: Path, claim_dirs: Mapping[str, Path], cache_dir: Path
) -> LocalFile | Download:
    """Where local mode reads a model from.

    http(s) is downloaded into `cache_dir`; file:///path is that path on this machine; a
    pvc://claim/path is read from the directory standing in for the claim: `claim_dirs[claim]`, or
    else the directory named like the claim beside the YAML file (`base_dir`).
    """
    if source.scheme in ("http", "https"):
        return Download(source.uri, cache_dir / f"{source.sha256}.onnx")
    return LocalFile(local_path(source.uri, base_dir=base_dir, claim_dirs=claim_dirs))


def local_path(uri: str, *, base_dir: Path, claim_dirs: Mapping[str, Path]) -> Path:
    """The file (or directory) on this machine that a file:// or pvc:// URI names."""
    if uri.startswith("file:"):
        return Path(unquote(urlsplit(uri).path))
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim_dirs.get(claim, base_dir / claim) / path


def plan_local_run(
    md: ModelDeployment,
    *,
    server_command: Sequence[str],
    model_paths: Mapping[str, Path],
    variant_ports: Mapping[str, int],
    router_port: int,
    routes_path: Path,
) -> LocalPlan:
    """The processes for `md`: each variant's server as the operator configures it, on loopback.

    Every variant is ready before the router starts, so the routes carry the spec's weights.
    """
    variants = []
    for variant in md.variants:
        port = variant_ports[variant.name]
        argv = (
            *server_command,
            "serve",
            "--model-path",
            str(model_paths[variant.name]),
            "--model-name",
            md.name,
            "--model-version",
            variant.name,
            "--sha256",
            variant.model.sha256,
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            *_NO_SHUTDOWN_DELAY,
        )
        env = render_server_settings_env(variant.server, md.example_instance)
        variants.append(LocalProcess(variant.name, argv, env, _loopback_url(port)))
    urls = {process.name: process.url for process in variants}
    routes = render_routes_config(md, dict(md.spec_weights), urls)
    router_argv = (
        *server_command,
        "route",
        "--config",
        str(routes_path),
        "--host",
        LOOPBACK,
        "--port",
        str(router_port),
        *_NO_SHUTDOWN_DELAY,
    )
    # The shadow disagreement log (with routing.shadow) goes beside the routes file.
    router_env = render_router_settings_env(md, str(routes_path.with_name(SHADOW_LOG_FILE)))
    router = LocalProcess(ROUTER_NAME, router_argv, router_env, _loopback_url(router_port))
    return LocalPlan(tuple(variants), router, routes)


def list_ignored_fields(md: ModelDeployment) -> list[str]:
    """One line per Kubernetes-only setting in `md` and what local mode does instead."""
    notes = []
    for i, variant in enumerate(md.variants):
        path = f"spec.variants[{i}]"
        if variant.replicas != 1:
            notes.append(f"{path}.replicas: {variant.replicas} -> one process")
        if variant.autoscaling is not None:
            notes.append(f"{path}.autoscaling: no autoscaling, one process")
        if variant.resources:
            notes.append(f"{path}.resources: not enforced")
    if md.routing.mode != "router":
        notes.append(
            f"spec.routing.mode: {md.routing.mode} -> the router process, with the same weights"
        )
    if md.routing.gateway is not None:
        notes.append("spec.routing.gateway: no Gateway, no HTTPRoute")
    for field in fields(PodSettings):
        value = getattr(md.pod, field.name)
        if value != field.default:
            notes.append(f"spec.pod.{_camel_case(field.name)}: applies to pods only")
    return notes


def render_example_requests(
    md: ModelDeployment,
    router_url: str,
    inputs: Sequence[Mapping[str, Any]],
    instance: Mapping[str, Any] | None,
) -> list[str]:
    """Ready-to-paste curl commands: v2 through the split, records pinned to the last variant,
    and CSV in and out. `inputs` is the model's v2 metadata (`name`, `datatype`, `shape`)."""
    values = {i["name"]: _example_value(i, instance) for i in inputs}
    tensors = [
        {
            "name": i["name"],
            "shape": _example_shape(i["shape"]),
            "datatype": i["datatype"],
            "data": _example_data(values[i["name"]], _example_shape(i["shape"])),
        }
        for i in inputs
    ]
    json_type = "-H 'content-type: application/json'"
    v2_body = json.dumps({"inputs": tensors}, separators=(",", ":"))
    records_body = json.dumps({"instances": [values]}, separators=(",", ":"))
    csv_lines = [_csv_line(values.keys()), _csv_line(values.values())]
    pinned = md.variants[-1].name
    model_url = f"{router_url}/v2/models/{md.name}"
    return [
        f"curl -s {model_url}/infer {json_type} -d {shlex.quote(v2_body)}",
        f"curl -s {router_url}/v1/models/{md.name}:predict {json_type} "
        f"-H '{md.routing.header_override}: {pinned}' -d {shlex.quote(records_body)}",
        f"printf '%s\\n' {' '.join(shlex.quote(line) for line in csv_lines)} | "
        f"curl -s {router_url}/v1/models/{md.name}:predict "
        "-H 'content-type: text/csv' -H 'accept: text/csv' --data-binary @-",
    ]


def _example_value(tensor: Mapping[str, Any], instance: Mapping[str, Any] | None) -> Any:
    if instance is not None and tensor["name"] in instance:
        return instance[tensor["name"]]
    datatype = tensor["datatype"]
    placeholder = "" if datatype == "BYTES" else False if datatype == "BOOL" else 0
    # One row's worth: a list when a row holds several values (shape [-1, 3]).
    per_row = math.prod(_example_shape(tensor["shape"])[1:])
    return placeholder if per_row == 1 else [placeholder] * per_row


def _example_shape(shape: Sequence[int]) -> list[int]:
    # One row: every dynamic dimension (-1 in v2 metadata) becomes 1.
    return [1 if dim < 0 else dim for dim in shape]


def _example_data(value: Any, shape: Sequence[int]) -> list[Any]:
    return list(value) if isinstance(value, list) else [value] * math.prod(shape)


def _csv_line(cells: Iterable[Any]) -> str:
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(cells)
    return line.getvalue()


def _loopback_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}"


def _camel_case(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(word.capitalize() for word in rest)
