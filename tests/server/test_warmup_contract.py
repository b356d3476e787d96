"""The example-instance annotation reaches the server as its warm-up request, in pods (what the
operator renders) and in local mode, through the server's own configuration parser."""

from __future__ import annotations

from pathlib import Path

import yaml

from modeldeploy_operator.local import plan_local_run
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_server.config import parse_serve_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "iris.yaml"
IRIS_INSTANCE = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def test_pods_and_local_servers_warm_up_with_the_annotated_example() -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    md = parse_model_deployment(manifest)
    assert md.example_instance == IRIS_INSTANCE
    servers = [
        obj
        for obj in render_objects(md, server_image="modeldeploy-server:test")
        if obj["kind"] == "Deployment"
        and obj["metadata"]["labels"]["app.kubernetes.io/component"] != "router"
    ]
    assert len(servers) == len(md.variants)
    for deployment in servers:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert parse_serve_config([], env).warmup_example == IRIS_INSTANCE

    plan = plan_local_run(
        md,
        server_command=("modeldeploy-server",),
        model_paths={v.name: Path(f"/{v.name}.onnx") for v in md.variants},
        variant_ports={"v1": 9001, "v2": 9002},
        router_port=9000,
        routes_path=Path("/routes.json"),
    )
    for process in plan.variants:
        assert process.argv[1] == "serve"
        config = parse_serve_config(list(process.argv[2:]), process.env)
        assert config.warmup_example == IRIS_INSTANCE

    del manifest["metadata"]["annotations"]
    bare = parse_model_deployment(manifest)
    assert bare.example_instance is None
    (container, *_) = render_objects(bare, server_image="s")[0]["spec"]["template"]["spec"][
        "containers"
    ]
    assert "MODELDEPLOY_WARMUP_EXAMPLE" not in {e["name"] for e in container["env"]}
