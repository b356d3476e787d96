"""parse_model_deployment: defaults, frozen result, and the mistakes it must name."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from modeldeploy_operator.spec import (
    DEFAULT_HEADER_OVERRIDE,
    Analysis,
    Bound,
    Gate,
    InvalidSpecError,
    ModelSource,
    Probes,
    Rollout,
    RolloutStep,
    Shadow,
    ShadowStep,
    parse_model_deployment,
)
from tests.invalid_manifests import SHA_V1 as GOLDEN_SHA
from tests.invalid_manifests import minimal_manifest, rollout_manifest
from tests.operator.builders import SHA_V1, model_deployment, variant

EXAMPLE = "examples/production.yaml"


def test_defaults_are_applied() -> None:
    md = parse_model_deployment(model_deployment())
    assert [(v.name, v.weight, v.replicas, v.autoscaling) for v in md.variants] == [
        ("v1", 90, 1, None),
        ("v2", 10, 1, None),
    ]
    assert md.routing.mode == "router"
    assert md.routing.header_override == DEFAULT_HEADER_OVERRIDE
    assert md.routing.gateway is None
    assert md.routing.sticky_header is None
    assert md.pod.image is None and md.pod.tolerations == ()
    assert md.variants[0].server.max_batch_size is None
    assert md.uid == "0c4b7a4e-1f0e-4d8a-9a59-0d6f6a1e2b3c"


def test_offline_object_without_namespace_or_uid() -> None:
    obj = model_deployment(uid=None)
    del obj["metadata"]["namespace"], obj["metadata"]["generation"]
    md = parse_model_deployment(obj)
    assert (md.namespace, md.uid, md.generation) == ("default", None, 1)


def test_production_example_parses() -> None:
    with open(EXAMPLE) as f:
        md = parse_model_deployment(yaml.safe_load(f))
    assert [v.weight for v in md.variants] == [90, 10]
    assert all(v.model.scheme == "https" for v in md.variants)
    v1 = md.variants[0]
    assert v1.autoscaling is not None and v1.min_replicas == v1.autoscaling.min_replicas == 3
    assert v1.server.max_batch_delay_ms == 2.0 and v1.server.request_timeout_seconds == 30.0


def test_result_is_frozen_and_detached_from_the_input() -> None:
    obj = model_deployment(variants=[variant("v1", 100, resources={"limits": {"cpu": "1"}})])
    md = parse_model_deployment(obj)
    obj["spec"]["variants"][0]["resources"]["limits"]["cpu"] = "8"
    assert md.variants[0].resources == {"limits": {"cpu": "1"}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        md.variants[0].weight = 5  # type: ignore[misc]


def test_gateway_settings() -> None:
    md = parse_model_deployment(
        model_deployment(
            routing={
                "mode": "gateway",
                "headerOverride": "X-Variant",
                "gateway": {
                    "parentRefs": [{"name": "gw", "namespace": "infra"}],
                    "hostnames": ["iris.example.com"],
                },
            }
        )
    )
    assert md.routing.header_override == "x-variant"  # header names are case-insensitive
    assert md.routing.gateway is not None
    assert md.routing.gateway.path_prefix == "/"
    assert md.routing.gateway.hostnames == ("iris.example.com",)


def test_pvc_uri_splits_into_claim_and_path() -> None:
    source = ModelSource(uri="pvc://models/iris/v1/model.onnx", sha256=SHA_V1)
    assert source.pvc_claim_and_path == ("models", "iris/v1/model.onnx")


def _with_variant(**fields: Any) -> dict[str, Any]:
    return model_deployment(variants=[variant("v1", 100, **fields)])


def _with_model(uri: str = "https://m.example/a.onnx", sha256: str = SHA_V1) -> dict[str, Any]:
    return _with_variant(model={"uri": uri, "sha256": sha256})


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no spec", {"metadata": {"name": "x"}}, "spec: required"),
    ("name with a dot", model_deployment(name="iris.v1"), "metadata.name"),
    ("name starting with a digit", model_deployment(name="1ris"), "metadata.name"),
    ("no variants", model_deployment(variants=[]), "spec.variants"),
    (
        "derived name too long",
        model_deployment(name="m" * 61, variants=[variant("v1", 100)]),
        "spec.variants[0].name",
    ),
    (
        "variant name upper case",
        model_deployment(variants=[variant("V1", 100)]),
        "spec.variants[0].name",
    ),
    (
        "duplicate names",
        model_deployment(variants=[variant("v1", 50), variant("v1", 50)]),
        "duplicate",
    ),
    (
        "weights sum to 90",
        model_deployment(variants=[variant("v1", 80), variant("v2", 10)]),
        "sum to 90",
    ),
    ("weight above 100", model_deployment(variants=[variant("v1", 101)]), "weight"),
    ("weight is a boolean", model_deployment(variants=[variant("v1", True)]), "boolean"),
    ("weight is a string", model_deployment(variants=[variant("v1", "100")]), "expected int"),
    ("short sha256", _with_model(sha256="abc"), "sha256"),
    ("upper-case sha256", _with_model(sha256="A" * 64), "sha256"),
    ("ftp uri", _with_model(uri="ftp://m.example/a.onnx"), "model.uri"),
    ("bare path", _with_model(uri="/models/a.onnx"), "model.uri"),
    ("relative file uri", _with_model(uri="file://models/a.onnx"), "absolute"),
    ("pvc without path", _with_model(uri="pvc://claim"), "pvc://<claim>"),
    ("pvc with bad claim", _with_model(uri="pvc://Claim_1/a.onnx"), "pvc://<claim>"),
    ("pvc escaping its claim", _with_model(uri="pvc://claim/../etc/a.onnx"), ".."),
    ("negative replicas", _with_variant(replicas=-1), "replicas"),
    (
        "autoscaling min above max",
        _with_variant(autoscaling={"minReplicas": 4, "maxReplicas": 2}),
        "minReplicas",
    ),
    ("autoscaling without max", _with_variant(autoscaling={"minReplicas": 1}), "maxReplicas"),
    ("negative server setting", _with_variant(server={"maxBatchSize": -1}), "maxBatchSize"),
    ("unknown routing mode", model_deployment(routing={"mode": "istio"}), "routing.mode"),
    ("gateway without parentRefs", model_deployment(routing={"mode": "gateway"}), "parentRefs"),
    (
        "bad header name",
        model_deployment(routing={"headerOverride": "x variant"}),
        "headerOverride",
    ),
    (
        "shadow variant with live weight",
        model_deployment(routing={"shadow": {"variant": "v2", "percent": 5}}),
        "spec.routing.shadow.variant: 'v2' must name a variant with weight 0",
    ),
    (
        "shadow percent above 100",
        model_deployment(
            variants=[variant("v1", 100), variant("v2", 0)],
            routing={"shadow": {"variant": "v2", "percent": 150}},
        ),
        "spec.routing.shadow.percent: 150 is not in 0..100",
    ),
    (
        "shadow in mode none",
        model_deployment(
            variants=[variant("v1", 100), variant("v2", 0)],
            routing={"mode": "none", "shadow": {"variant": "v2", "percent": 5}},
        ),
        "spec.routing.shadow: needs routing mode router or gateway",
    ),
    (
        "bad sticky header name",
        model_deployment(routing={"stickyHeader": "x user"}),
        "spec.routing.stickyHeader: 'x user' is not a header name",
    ),
    (
        "sticky header equal to the override header",
        model_deployment(routing={"headerOverride": "X-User", "stickyHeader": "x-user"}),
        "spec.routing.stickyHeader: must differ from headerOverride",
    ),
    (
        "sticky header in gateway mode",
        model_deployment(
            routing={
                "mode": "gateway",
                "gateway": {"parentRefs": [{"name": "gw"}]},
                "stickyHeader": "x-user",
            }
        ),
        "spec.routing.stickyHeader: only allowed when mode is router",
    ),
    (
        "router timeout in gateway mode",
        model_deployment(
            routing={
                "mode": "gateway",
                "gateway": {"parentRefs": [{"name": "gw"}]},
                "timeoutSeconds": 30,
            }
        ),
        "spec.routing.timeoutSeconds: 30 must be 1..3600, in router mode only",
    ),
    (
        "router timeout of 0",
        model_deployment(routing={"timeoutSeconds": 0}),
        "spec.routing.timeoutSeconds: 0 must be 1..3600, in router mode only",
    ),
    (
        "rollout prometheus without url",
        {
            **rollout_manifest(),
            "spec": {**rollout_manifest()["spec"], "rollout": {"analysis": {"prometheus": {}}}},
        },
        "spec.rollout.analysis.prometheus.url: required",
    ),
    (
        "reserved pod label",
        model_deployment(pod={"labels": {"modeldeploy.dev/variant": "x"}}),
        "spec.pod.labels",
    ),
]


@pytest.mark.parametrize(("obj", "fragment"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_specs_are_refused_with_the_field_named(obj: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_model_deployment(obj)
    assert fragment in str(caught.value)


def test_shadow_is_parsed() -> None:
    md = parse_model_deployment(
        model_deployment(
            variants=[variant("v1", 100), variant("v2", 0)],
            routing={"shadow": {"variant": "v2", "percent": 5, "tolerance": 0.5}},
        )
    )
    assert md.routing.shadow == Shadow(variant="v2", percent=5, tolerance=0.5)


def test_gate_and_rollout_are_parsed() -> None:
    md = parse_model_deployment(rollout_manifest())
    gate = md.variants[1].gate
    assert md.variants[0].gate is None
    assert gate == Gate(
        dataset=ModelSource("https://data.example.com/iris/golden.csv", GOLDEN_SHA),
        format="csv",
        against="v1",
        outputs=("label",),
        absolute_tolerance=0.001,
        relative_tolerance=0.01,
        min_agreement=0.98,
    )
    assert md.rollout == Rollout(
        steps=(RolloutStep(10, 300), RolloutStep(50, 600)),
        analysis=Analysis(
            error_rate=Bound(max=0.01, max_ratio_to_stable=2.0),
            p99_latency_ms=Bound(max_ratio_to_stable=1.5),
            shadow_disagreement=Bound(max=0.05),
            prometheus_url="http://prometheus.monitoring.svc:9090",
        ),
        min_samples=200,
        failure_limit=1,
        low_traffic="rollback",
        interval_seconds=15,
        deadline_seconds=7200,
        probes=Probes(requests_per_second=3),
        shadow=ShadowStep(percent=50, hold_seconds=120, tolerance=0.001),
    )


def test_rollout_defaults() -> None:
    manifest = rollout_manifest()
    manifest["spec"]["rollout"] = {}
    del manifest["spec"]["variants"][1]["gate"]["against"]
    md = parse_model_deployment(manifest)
    assert md.rollout == Rollout()
    assert md.rollout.low_traffic == "hold" and md.rollout.min_samples == 100
    gate = md.variants[1].gate
    assert gate is not None and gate.against is None
    assert parse_model_deployment(minimal_manifest()).rollout is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda m: m["spec"]["variants"][1]["gate"].update(against="v2"),
            "spec.variants[1].gate.against: 'v2' must name another variant",
        ),
        (
            lambda m: m["spec"]["variants"][1]["gate"]["dataset"].update(uri="s3://b/x.csv"),
            "spec.variants[1].gate.dataset.uri",
        ),
        (
            lambda m: m["spec"]["variants"][1]["gate"].update(minAgreement=2),
            "spec.variants[1].gate.minAgreement",
        ),
        (
            lambda m: m["spec"]["rollout"]["steps"].reverse(),
            "spec.rollout.steps: percent must increase",
        ),
        (
            lambda m: m["spec"]["rollout"].update(lowTraffic="guess"),
            "spec.rollout.lowTraffic",
        ),
        (
            lambda m: m["spec"]["rollout"]["steps"][1].pop("percent"),
            "spec.rollout.steps[1].percent: required",
        ),
        (
            lambda m: m["spec"]["rollout"]["probes"].update(requestsPerSecond=101),
            "spec.rollout.probes.requestsPerSecond: 101 is outside",
        ),
        (
            lambda m: m["spec"]["variants"][1].pop("gate"),
            "spec.rollout.probes: needs a variant with a gate",
        ),
        (
            lambda m: m["spec"].update(routing={"mode": "none"}),
            "spec.rollout.shadow: needs routing mode router",
        ),
        (
            lambda m: (
                m["spec"]["rollout"].pop("shadow"),
                m["spec"].update(routing={"mode": "none"}),
            ),
            "spec.rollout.probes: needs routing mode router",
        ),
        (
            lambda m: m["spec"]["rollout"]["analysis"].pop("shadowDisagreement"),
            "spec.rollout.shadow: needs spec.rollout.analysis.shadowDisagreement.max",
        ),
        (
            lambda m: m["spec"]["rollout"]["shadow"].update(percent=0),
            "spec.rollout.shadow: percent must be in 1..100",
        ),
    ],
)
def test_invalid_gate_or_rollout(change: Any, fragment: str) -> None:
    manifest = rollout_manifest()
    change(manifest)
    with pytest.raises(InvalidSpecError) as caught:
        parse_model_deployment(manifest)
    assert fragment in str(caught.value)
