"""Local mode's pure core: model locations, the process plan, ignored fields, example requests."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from modeldeploy_operator.local import (
    Download,
    LocalFile,
    LocalPlan,
    list_ignored_fields,
    locate_model,
    plan_local_run,
    render_example_requests,
)
from modeldeploy_operator.render import routes_version
from modeldeploy_operator.spec import (
    ModelDeployment,
    ModelSource,
    parse_example_instance,
    parse_model_deployment,
)
from tests.invalid_manifests import SHA_V1, VALID_MANIFESTS

BASE = Path("/work/project")
CACHE = Path("/cache")


@pytest.mark.parametrize(
    ("uri", "claims", "location"),
    [
        ("https://h/m.onnx", {}, Download("https://h/m.onnx", CACHE / f"{SHA_V1}.onnx")),
        ("http://h:8000/m.onnx", {}, Download("http://h:8000/m.onnx", CACHE / f"{SHA_V1}.onnx")),
        ("file:///srv/models/a%20b.onnx", {}, LocalFile(Path("/srv/models/a b.onnx"))),
        ("pvc://models/iris/v1.onnx", {}, LocalFile(BASE / "models" / "iris" / "v1.onnx")),
        (
            "pvc://models/iris/v1.onnx",
            {"models": Path("/data")},
            LocalFile(Path("/data/iris/v1.onnx")),
        ),
    ],
    ids=["https", "http", "file", "pvc-beside-yaml", "pvc-mapped"],
)
def test_locate_model(uri: str, claims: dict[str, Path], location: object) -> None:
    source = ModelSource(uri=uri, sha256=SHA_V1)
    assert locate_model(source, base_dir=BASE, claim_dirs=claims, cache_dir=CACHE) == location


def plan_example(manifest: str) -> tuple[ModelDeployment, LocalPlan]:
    """The local plan of a valid example manifest: models in /m, ports from 9000, router 8080."""
    md = parse_model_deployment(VALID_MANIFESTS[manifest]("iris"))
    names = [v.name for v in md.variants]
    plan = plan_local_run(
        md,
        server_command=("modeldeploy-server",),
        model_paths={n: Path(f"/m/{n}.onnx") for n in names},
        variant_ports={n: 9000 + i for i, n in enumerate(names)},
        router_port=8080,
        routes_path=Path("/run/routes.json"),
    )
    return md, plan


def test_plan_starts_each_variant_as_the_operator_configures_it() -> None:
    md, plan = plan_example("full")
    v1 = plan.variants[0]
    assert v1.argv == (
        "modeldeploy-server",
        "serve",
        "--model-path",
        "/m/v1.onnx",
        "--model-name",
        "iris",
        "--model-version",
        "v1",
        "--sha256",
        md.variants[0].model.sha256,
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
        # Local mode stops every process at once: nothing to drain away from.
        "--shutdown-delay-s",
        "0",
    )
    # The same env the operator gives the variant's pod for `server:` settings.
    assert v1.env == {
        "MODELDEPLOY_MAX_BATCH_SIZE": "32",
        "MODELDEPLOY_MAX_BATCH_DELAY_MS": "2",
        "MODELDEPLOY_INTRA_OP_THREADS": "1",
        "MODELDEPLOY_MAX_REQUEST_BYTES": "6291456",
        "MODELDEPLOY_MAX_ROWS": "10000",
        "MODELDEPLOY_REQUEST_TIMEOUT_S": "30",
    }
    assert plan.variants[1].env == {}
    assert plan.router.argv == (
        "modeldeploy-server",
        "route",
        "--config",
        "/run/routes.json",
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
        "--shutdown-delay-s",
        "0",
    )
    assert plan.router.env == {}
    routes = dict(plan.routes)
    # The version is the hash of the routes the router really gets (loopback URLs).
    assert routes.pop("version") == routes_version(routes)
    assert routes == {
        "model": "iris",
        "headerOverride": "x-iris-variant",
        "variants": [
            {"name": "v1", "url": "http://127.0.0.1:9000", "weight": 90},
            {"name": "v2", "url": "http://127.0.0.1:9001", "weight": 10},
            {"name": "v3-dark", "url": "http://127.0.0.1:9002", "weight": 0},
        ],
    }


def test_plan_gives_the_router_the_timeout_and_a_shadow_log_beside_its_routes() -> None:
    _, plan = plan_example("shadow")
    # The same env the operator gives the router's pod, the log in the run's folder.
    assert plan.router.env == {
        "MODELDEPLOY_ROUTER_TIMEOUT_S": "20",
        "MODELDEPLOY_ROUTER_SHADOW_LOG": "/run/shadow-disagreements.jsonl",
        "MODELDEPLOY_ROUTER_SHADOW_LOG_MAX_BYTES": str(8 << 20),
    }


def test_every_kubernetes_only_field_is_reported() -> None:
    md = parse_model_deployment(VALID_MANIFESTS["full"]("iris"))
    assert list_ignored_fields(md) == [
        "spec.variants[0].replicas: 2 -> one process",
        "spec.variants[0].resources: not enforced",
        "spec.variants[1].autoscaling: no autoscaling, one process",
        "spec.variants[1].resources: not enforced",
        "spec.variants[2].replicas: 0 -> one process",
        "spec.routing.mode: gateway -> the router process, with the same weights",
        "spec.routing.gateway: no Gateway, no HTTPRoute",
        "spec.pod.image: applies to pods only",
        "spec.pod.imagePullSecrets: applies to pods only",
        "spec.pod.serviceAccountName: applies to pods only",
        "spec.pod.nodeSelector: applies to pods only",
        "spec.pod.tolerations: applies to pods only",
        "spec.pod.affinity: applies to pods only",
        "spec.pod.labels: applies to pods only",
        "spec.pod.annotations: applies to pods only",
    ]


def test_nothing_is_reported_for_a_plain_manifest() -> None:
    assert list_ignored_fields(parse_model_deployment(VALID_MANIFESTS["two-variants"]("m"))) == []


@pytest.mark.parametrize(
    ("annotations", "instance"),
    [
        ({}, None),
        ({"modeldeploy.dev/example-instance": '{"a": 1}'}, {"a": 1}),
        ({"modeldeploy.dev/example-instance": "[1, 2]"}, None),
        ({"modeldeploy.dev/example-instance": "{not json"}, None),
    ],
    ids=["absent", "object", "not-an-object", "not-json"],
)
def test_parse_example_instance(annotations: dict[str, str], instance: object) -> None:
    assert parse_example_instance(annotations) == instance


def bodies(commands: list[str]) -> list[Any]:
    """The -d payload of the v2 and records commands."""
    return [json.loads(shlex.split(c)[shlex.split(c).index("-d") + 1]) for c in commands[:2]]


def test_example_requests_use_the_instance_and_the_metadata() -> None:
    md = parse_model_deployment(VALID_MANIFESTS["two-variants"]("iris"))
    inputs = [
        {"name": "amount", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "country", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    commands = render_example_requests(
        md, "http://127.0.0.1:8080", inputs, {"amount": 12.5, "country": "it's, quoted"}
    )
    v2, records = bodies(commands)
    assert v2 == {
        "inputs": [
            {"name": "amount", "shape": [1, 1], "datatype": "FP32", "data": [12.5]},
            {"name": "country", "shape": [1, 1], "datatype": "BYTES", "data": ["it's, quoted"]},
        ]
    }
    assert records == {"instances": [{"amount": 12.5, "country": "it's, quoted"}]}
    assert "-H 'x-model-variant: v2'" in commands[1]
    assert shlex.split(commands[2].split(" | ")[0]) == [
        "printf",
        "%s\\n",
        "amount,country",
        '12.5,"it\'s, quoted"',
    ]


def test_example_requests_without_an_instance_use_placeholders() -> None:
    md = parse_model_deployment(VALID_MANIFESTS["minimal"]("iris"))
    inputs = [
        {"name": "x", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "flag", "datatype": "BOOL", "shape": [-1]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
    ]
    v2, records = bodies(render_example_requests(md, "http://h", inputs, None))
    assert [t["data"] for t in v2["inputs"]] == [[0, 0, 0], [False], [""]]
    assert [t["shape"] for t in v2["inputs"]] == [[1, 3], [1], [1]]
    assert records == {"instances": [{"x": [0, 0, 0], "flag": False, "text": ""}]}
