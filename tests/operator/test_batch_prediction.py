"""BatchPrediction: offline validation, parsing, the rendered Indexed Job, the computed status."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import yaml

from modeldeploy_operator.batch_render import (
    UnresolvedModel,
    batch_selector,
    render_batch_job,
    resolve_model,
)
from modeldeploy_operator.batch_status import (
    compute_batch_events,
    compute_batch_status,
    parse_indexes,
    shard_reports,
)
from modeldeploy_operator.spec import (
    BATCH_KIND,
    ModelSource,
    parse_batch_prediction,
    parse_model_deployment,
)
from modeldeploy_operator.validation import (
    default_model_deployment,
    load_schema,
    validate_model_deployment,
)
from tests.conftest import REPO_ROOT

SHA = "a" * 64
IMAGE = "registry.example/modeldeploy-server:1"
NOW = "2026-12-01T16:00:00Z"
SCHEMES = "must start with https://, http://, file:// or pvc://"
URI_FORMS = (
    "must be https://host/path, http://host/path, file:///absolute/path or pvc://claim/path (a "
    "lowercase claim name), without spaces"
)


def manifest(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "BatchPrediction",
        "metadata": {"name": "weekly", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"uri": "pvc://models/churn.onnx", "sha256": SHA},
            "input": {"uri": "pvc://data/customers.csv"},
            "output": {"uri": "pvc://data/scores/"},
            **spec,
        },
    }


def errors_of(obj: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e.field, e.message) for e in validate_model_deployment(obj, BATCH_KIND)]


def test_the_example_is_valid_and_defaults_fill_in() -> None:
    example = yaml.safe_load((REPO_ROOT / "examples" / "batchprediction.yaml").read_text())
    assert validate_model_deployment(example, BATCH_KIND) == []
    stored = default_model_deployment(manifest(), BATCH_KIND)
    assert stored["spec"]["shards"] == 1 and stored["spec"]["input"]["format"] == "csv"
    assert (stored["spec"]["onError"], stored["spec"]["retriesPerShard"]) == ("fail", 2)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            {
                "model": {
                    "uri": "pvc://m/a.onnx",
                    "sha256": SHA,
                    "modelDeployment": {"name": "a", "variant": "v1"},
                }
            },
            "spec.model",
            "Invalid value: set either modelDeployment or uri and sha256",
        ),
        (
            {"model": {"uri": "pvc://m/a.onnx"}},
            "spec.model.sha256",
            "Required value: uri and sha256 go together",
        ),
        (
            {"shards": 2, "parallelism": 3},
            "spec.parallelism",
            "Invalid value: must not exceed shards",
        ),
        (
            {"model": {"uri": "s3://bucket/a.onnx", "sha256": SHA}},
            "spec.model.uri",
            f'Invalid value: "s3://bucket/a.onnx": unsupported scheme: the model URI {SCHEMES}',
        ),
        (
            {"input": {"uri": "gs://bucket/data.csv"}},
            "spec.input.uri",
            f'Invalid value: "gs://bucket/data.csv": unsupported scheme: the input URI {SCHEMES}',
        ),
        (
            {"input": {"uri": "file://data.csv"}},
            "spec.input.uri",
            f'Invalid value: "file://data.csv": {URI_FORMS}',
        ),
        (
            {"output": {"uri": "s3://bucket/scores/"}},
            "spec.output.uri",
            'Invalid value: "s3://bucket/scores/": unsupported scheme: the output must be a '
            "directory on a PersistentVolumeClaim, pvc://claim/dir/",
        ),
        (
            {"output": {"uri": "pvc://data/scores"}},
            "spec.output.uri",
            'Invalid value: "pvc://data/scores": must be pvc://claim/dir/ or pvc://claim/ (a '
            "lowercase claim name; a directory, so ending in /), without spaces",
        ),
        ({"input": {"uri": "pvc://data/../x.csv"}}, "spec.input.uri", None),
        ({"input": {"uri": "pvc://data/x.csv", "format": "parquet"}}, "spec.input.format", None),
        ({"onError": "ignore"}, "spec.onError", None),
    ],
)
def test_invalid_batch_predictions_name_the_field(
    change: dict[str, Any], field: str, message: str | None
) -> None:
    errors = errors_of(manifest(**change))
    assert field in {f for f, _ in errors}, errors
    if message is not None:
        assert (field, message) in errors


@pytest.mark.parametrize("file_format", ["csv", "jsonl", "npz"])
def test_every_batch_format_is_accepted_and_reaches_the_shards(file_format: str) -> None:
    obj = manifest(input={"uri": "pvc://data/customers." + file_format, "format": file_format})
    assert errors_of(obj) == []
    bp = parse_batch_prediction(obj)
    job = render_batch_job(bp, bp.model, server_image=IMAGE)
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODELDEPLOY_BATCH_FORMAT"] == file_format
    # The run: the last shard to finish writes manifest.json from this uid's part manifests.
    assert (env["MODELDEPLOY_BATCH_RUN_ID"], env["MODELDEPLOY_BATCH_RUN_NAME"]) == ("u-1", "weekly")


def test_transition_rules_are_left_to_updates() -> None:
    # `self == oldSelf` (immutability) has no old object at creation, offline or at admission.
    spec_rules = load_schema(BATCH_KIND)["properties"]["spec"]["x-kubernetes-validations"]
    assert any("oldSelf" in rule["rule"] for rule in spec_rules)
    assert errors_of(manifest()) == []


def test_pod_and_resources_schemas_are_the_model_deployments() -> None:
    # One contract for pod settings: both CRDs take the same spec.pod and the same resources.
    batch = load_schema(BATCH_KIND)["properties"]["spec"]["properties"]
    md = load_schema()["properties"]["spec"]["properties"]
    variant = md["variants"]["items"]["properties"]

    def without_description(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in schema.items() if k != "description"}

    assert without_description(batch["pod"]) == without_description(md["pod"])
    assert without_description(batch["resources"]) == without_description(variant["resources"])


def parsed(**spec: Any) -> Any:
    return parse_batch_prediction(default_model_deployment(manifest(**spec), BATCH_KIND))


def test_render_is_an_indexed_job_one_index_per_shard_with_per_index_retries() -> None:
    bp = parsed(shards=4, parallelism=2, retriesPerShard=3, onError="skip")
    job = render_batch_job(bp, bp.model, server_image=IMAGE)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 2)
    assert spec["backoffLimitPerIndex"] == 3
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailIndex"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["args"] == ["batch", "--shard", "$(JOB_COMPLETION_INDEX)/4"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODELDEPLOY_BATCH_INPUT"] == "/input/customers.csv"
    assert env["MODELDEPLOY_BATCH_OUTPUT"] == "/output/scores"
    assert env["MODELDEPLOY_BATCH_ON_ERROR"] == "skip"
    assert env["MODELDEPLOY_MODEL_SHA256"] == SHA
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # The input and output share claim "data": one volume, mounted read-write at /output and
    # read-only at /input; the model's claim is read-only.
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    assert claims["output"] == {"claimName": "data"}
    assert claims["model-source"] == {"claimName": "models", "readOnly": True}
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/input"] == "output"
    for c in [*pod["initContainers"], container]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("BatchPrediction", "u-1", True)
    assert job["metadata"]["annotations"]["modeldeploy.dev/model-sha256"] == SHA
    assert render_batch_job(bp, bp.model, server_image=IMAGE) == job  # deterministic
    assert batch_selector("weekly") == (
        "app.kubernetes.io/managed-by=modeldeploy-operator,modeldeploy.dev/batch-prediction=weekly"
    )


def test_the_model_of_a_variant_is_its_uri_and_digest() -> None:
    bp = parsed(model={"modelDeployment": {"name": "churn", "variant": "v2"}})
    md_doc = yaml.safe_load((REPO_ROOT / "examples" / "production.yaml").read_text())
    md_doc["metadata"]["name"] = "churn"
    md = parse_model_deployment(md_doc)
    variant = md.variants[1]
    md = dataclasses.replace(md, variants=(md.variants[0], dataclasses.replace(variant, name="v2")))
    assert resolve_model(bp, md) == variant.model
    with pytest.raises(UnresolvedModel, match="has no variant 'v2'"):
        resolve_model(bp, dataclasses.replace(md, variants=md.variants[:1]))
    with pytest.raises(UnresolvedModel, match="'churn' does not exist"):
        resolve_model(bp, None)


def pod(index: int, exit_code: int, message: dict[str, Any] | str, finished: str = NOW) -> Any:
    text = message if isinstance(message, str) else json.dumps(message)
    return {
        "metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": {
            "containerStatuses": [
                {
                    "name": "batch",
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "message": text,
                            "finishedAt": finished,
                        }
                    },
                }
            ]
        },
    }


def report(index: int, rows: int, skipped: int = 0) -> dict[str, Any]:
    return {
        "shard": {"index": index, "count": 2},
        "input": {"sha256": "b" * 64},
        "rowsIn": rows + skipped,
        "rowsOut": rows,
        "rowsSkipped": skipped,
        "part": {"name": f"part-{index:05d}-of-00002.csv", "bytes": 10 * rows, "sha256": "c" * 64},
    }


def job(status: dict[str, Any]) -> dict[str, Any]:
    bp = parsed(shards=2)
    rendered = render_batch_job(bp, bp.model, server_image=IMAGE)
    return {**rendered, "status": status}


def test_status_moves_from_pending_to_running_to_succeeded() -> None:
    bp = parsed(shards=2)
    pending = compute_batch_status(bp, None, [], None, None, NOW)
    assert (pending["phase"], pending["shardsDone"]) == ("Pending", "0/2")
    running_job = job({"startTime": "2026-12-01T15:59:50Z", "completedIndexes": "0"})
    running = compute_batch_status(
        bp, running_job, [pod(0, 0, report(0, 1000))], None, pending, NOW
    )
    assert (running["phase"], running["shardsDone"], running["rowsOut"]) == ("Running", "1/2", 1000)
    assert running["rowsPerSecond"] == "100.0"
    assert [e.reason for e in compute_batch_events(pending, running)] == ["Started"]
    done = job(
        {
            "startTime": "2026-12-01T15:59:50Z",
            "completionTime": "2026-12-01T16:00:10Z",
            "completedIndexes": "0-1",
            "conditions": [{"type": "Complete", "status": "True"}],
        }
    )
    pods = [pod(0, 0, report(0, 1000)), pod(1, 0, report(1, 900, skipped=100))]
    succeeded = compute_batch_status(bp, done, pods, None, running, "2026-12-01T16:01:00Z")
    assert succeeded["phase"] == "Succeeded"
    assert (succeeded["rowsIn"], succeeded["rowsOut"], succeeded["rowsSkipped"]) == (
        2000,
        1900,
        100,
    )
    assert succeeded["rowsPerSecond"] == "100.0"
    assert succeeded["modelSha256"] == SHA and succeeded["inputSha256"] == "b" * 64
    assert [o["name"] for o in succeeded["outputs"]] == [
        "part-00000-of-00002.csv",
        "part-00001-of-00002.csv",
    ]
    complete = {c["type"]: c for c in succeeded["conditions"]}["Complete"]
    assert complete["status"] == "True"
    assert [e.reason for e in compute_batch_events(running, succeeded)] == ["Completed"]
    # Computed again from the same observation: the same status, transition times kept.
    assert (
        compute_batch_status(bp, done, pods, None, succeeded, "2026-12-01T17:00:00Z") == succeeded
    )


def test_a_failed_shard_says_why_from_its_termination_message() -> None:
    bp = parsed(shards=2)
    failed_job = job(
        {
            "startTime": "2026-12-01T15:59:50Z",
            "completedIndexes": "0",
            "failedIndexes": "1",
            "conditions": [
                {"type": "Failed", "status": "True", "lastTransitionTime": "2026-12-01T16:00:00Z"}
            ],
        }
    )
    pods = [
        pod(0, 0, report(0, 10)),
        pod(1, 1, {"error": "line 7: CSV line 7 has 3 fields, header has 4"}),
        pod(1, 137, "", finished="2026-12-01T15:59:55Z"),
    ]
    status = compute_batch_status(bp, failed_job, pods, None, None, NOW)
    assert (status["phase"], status["shardsFailed"], status["shardsSucceeded"]) == ("Failed", 1, 1)
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True"
    assert failed["message"] == "shard 1: line 7: CSV line 7 has 3 fields, header has 4"
    assert status["completionTime"] == "2026-12-01T16:00:00Z"
    (event,) = compute_batch_events(None, status)
    assert (event.type, event.reason) == ("Warning", "Failed")


def test_an_unresolved_model_keeps_it_pending_and_says_so() -> None:
    bp = parsed(model={"modelDeployment": {"name": "churn", "variant": "v9"}})
    problem = ("ModelNotFound", "ModelDeployment 'churn' has no variant 'v9'")
    status = compute_batch_status(bp, None, [], problem, None, NOW)
    assert status["phase"] == "Pending"
    (event,) = compute_batch_events(None, status)
    assert event.reason == "ModelNotFound"


def test_a_job_the_api_server_refuses_fails_the_batch_prediction_for_good() -> None:
    problem = ("JobRejected", "the API server refused the Job: nodeSelector: Invalid value")
    status = compute_batch_status(parsed(), None, [], problem, None, NOW)
    assert status["phase"] == "Failed"
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "JobRejected")
    (event,) = compute_batch_events(None, status)
    assert (event.type, event.reason) == ("Warning", "JobRejected")


def test_indexes_and_reports_parse_what_the_job_controller_writes() -> None:
    assert parse_indexes("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert parse_indexes(None) == parse_indexes("") == []
    manifests, errors = shard_reports([pod(3, 0, report(3, 5)), pod(4, 1, "Traceback\nOOM")])
    assert list(manifests) == [3] and errors == {4: "Traceback\nOOM"}
    assert ModelSource("pvc://a/b.onnx", SHA).pvc_claim_and_path == ("a", "b.onnx")
