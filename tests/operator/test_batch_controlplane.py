"""BatchPrediction on the real control plane: admission (CEL immutability, parity with the offline
validator) and the operator, as a process under the shipped RBAC, creating the Indexed Job and
following it through its phases. No kubelet and no Job controller run here, so the test writes
what they would: the Job's status and the shard pods with their termination messages."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modeldeploy_operator import naming
from modeldeploy_operator.batch_render import render_batch_job
from modeldeploy_operator.spec import BATCH_KIND, parse_batch_prediction
from modeldeploy_operator.validation import default_model_deployment, validate_model_deployment
from tests.controlplane.harness import ControlPlane
from tests.operator.harness import OperatorProcess, running_operator, wait_for

GROUP, VERSION, PLURAL = "modeldeploy.dev", "v1alpha1", "batchpredictions"
SHA = "ab" * 32
MD_SHA = "cd" * 32


def batch_prediction(name: str = "weekly", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BatchPrediction",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "pvc://models/churn.onnx", "sha256": SHA},
            "input": {"uri": "pvc://data/customers.csv"},
            "output": {"uri": "pvc://data/scores/"},
            "shards": 2,
            **spec,
        },
    }


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api_client:
        yield api_client


def _refusal(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )
    return {"code": refused.value.status, **json.loads(refused.value.body or "{}")}


@pytest.mark.parametrize(
    "spec",
    [
        {
            "model": {
                "uri": "pvc://m/a.onnx",
                "sha256": SHA,
                "modelDeployment": {"name": "a", "variant": "v"},
            }
        },
        {"model": {"uri": "pvc://m/a.onnx"}},
        {"parallelism": 3},
        {"output": {"uri": "pvc://data/scores"}},
        {"input": {"uri": "pvc://data/./x.csv", "format": "xml"}},
        {"shards": 0, "onError": "ignore"},
        {"model": {"uri": "s3://bucket/a.onnx", "sha256": SHA}, "output": {"uri": "gs://b/out/"}},
        {"input": {"uri": "file://relative.csv"}, "output": {"uri": "pvc://Data/out dir/"}},
    ],
)
def test_invalid_batch_predictions_are_refused_as_the_offline_validator_says(
    api: client.ApiClient, namespace: str, spec: dict[str, Any]
) -> None:
    body = batch_prediction(**spec)
    status = _refusal(api, namespace, body)
    assert status["code"] == 422, status
    causes = sorted((c.get("field"), c["message"]) for c in status["details"]["causes"])
    assert sorted(validate_model_deployment(body, BATCH_KIND)) == causes


def test_the_spec_is_immutable_but_metadata_and_status_are_not(
    api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, batch_prediction())
    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "weekly", {"spec": {"shards": 3}}
        )
    assert refused.value.status == 422
    message = json.loads(refused.value.body or "{}")["message"]
    assert "spec: Forbidden: is immutable: a BatchPrediction runs once" in message
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "weekly", {"metadata": {"labels": {"team": "a"}}}
    )
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "weekly", {"status": {"phase": "Pending"}}
    )


class Batch:
    """The admin's view of one namespace with the operator running in it."""

    def __init__(self, api: client.ApiClient, namespace: str, operator: OperatorProcess) -> None:
        self.namespace = namespace
        self.operator = operator
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)

    def status(self, name: str) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def wait_phase(self, name: str, phase: str, **expected: Any) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            matches = all(status.get(k) == v for k, v in expected.items())
            return status if status.get("phase") == phase and matches else None

        return wait_for(
            probe,
            lambda: f"phase {phase} {expected}: {self.status(name)}\n{self.operator.log()[-2000:]}",
            timeout=120,
            check=self.operator.check_alive,
        )

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            job = self.batch.read_namespaced_job(name, self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        result: dict[str, Any] = self.batch.api_client.sanitize_for_serialization(job)
        return result

    def write_job_status(self, name: str, status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(name, self.namespace, {"status": status})

    def shard_pod(self, job: dict[str, Any], index: int, exit_code: int, message: Any) -> None:
        """A pod as the Job controller creates it, terminated as the kubelet reports it."""
        name = f"{job['metadata']['name']}-{index}-x"
        template = job["spec"]["template"]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": template["metadata"]["labels"],
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job["metadata"]["name"],
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {"restartPolicy": "Never", "containers": [{"name": "batch", "image": "x"}]},
        }
        self.core.create_namespaced_pod(self.namespace, body)
        terminated = {
            "exitCode": exit_code,
            "message": json.dumps(message),
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": "2026-12-01T16:00:00Z",
            "finishedAt": "2026-12-01T16:00:10Z",
        }
        container = {
            "name": "batch",
            "image": "x",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": terminated},
        }
        phase = "Succeeded" if exit_code == 0 else "Failed"
        self.core.patch_namespaced_pod_status(
            name, self.namespace, {"status": {"phase": phase, "containerStatuses": [container]}}
        )


@pytest.fixture
def cluster(
    control_plane: ControlPlane, api: client.ApiClient, namespace: str, tmp_path: Path
) -> Iterator[Batch]:
    with running_operator(control_plane, [namespace], tmp_path / "operator.log") as operator:
        yield Batch(api, namespace, operator)


def shard_report(index: int, rows: int) -> dict[str, Any]:
    return {
        "shard": {"index": index, "count": 2},
        "format": "csv",
        "model": {"sha256": MD_SHA},
        "input": {"uri": "/input/customers.csv", "sha256": "ef" * 32, "bytes": 1234},
        "rowsIn": rows,
        "rowsOut": rows,
        "rowsSkipped": 0,
        "part": {"name": f"part-{index:05d}-of-00002.csv", "bytes": 99, "sha256": "12" * 32},
        "skipped": None,
        "seconds": 1.5,
        "rowsPerSecond": rows / 1.5,
    }


def model_deployment() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": "churn"},
        "spec": {
            "variants": [
                {
                    "name": "v1",
                    "model": {"uri": "pvc://models/v1.onnx", "sha256": SHA},
                    "weight": 100,
                },
                {
                    "name": "v2",
                    "model": {"uri": "pvc://models/v2.onnx", "sha256": MD_SHA},
                    "weight": 0,
                },
            ],
            "routing": {"mode": "none"},
        },
    }


def test_the_operator_runs_a_batch_prediction_as_an_indexed_job_through_its_phases(
    cluster: Batch,
) -> None:
    custom = cluster.custom
    ns = cluster.namespace
    # Its model is the one variant v2 serves: waiting for the ModelDeployment, then resolved.
    manifest = batch_prediction(model={"modelDeployment": {"name": "churn", "variant": "v2"}})
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, copy.deepcopy(manifest))
    pending = cluster.wait_phase("weekly", "Pending")
    assert {c["reason"] for c in pending["conditions"]} == {"ModelNotFound"}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, "modeldeployments", model_deployment()
    )
    job = wait_for(
        lambda: cluster.job("weekly"), "the Job", timeout=120, check=cluster.operator.check_alive
    )
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["backoffLimitPerIndex"]) == (
        "Indexed",
        2,
        2,
    )
    assert job["metadata"]["annotations"]["modeldeploy.dev/model-sha256"] == MD_SHA
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner["kind"] == "BatchPrediction" and owner["controller"] is True

    cluster.write_job_status("weekly", {"startTime": "2026-12-01T16:00:00Z", "active": 2})
    cluster.wait_phase("weekly", "Running", shardsDone="0/2")
    cluster.shard_pod(job, 0, 0, shard_report(0, 600))
    cluster.write_job_status("weekly", {"completedIndexes": "0", "succeeded": 1, "active": 1})
    cluster.wait_phase("weekly", "Running", shardsDone="1/2", rowsOut=600)
    cluster.shard_pod(job, 1, 0, shard_report(1, 400))
    done_at = "2026-12-01T16:00:20Z"
    cluster.write_job_status(
        "weekly",
        {
            "completedIndexes": "0-1",
            "succeeded": 2,
            "active": 0,
            "completionTime": done_at,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": done_at},
                {"type": "Complete", "status": "True", "lastTransitionTime": done_at},
            ],
        },
    )
    status = cluster.wait_phase("weekly", "Succeeded", rowsOut=1000)
    assert status["modelSha256"] == MD_SHA and status["inputSha256"] == "ef" * 32
    assert status["rowsPerSecond"] == "50.0"
    assert [o["name"] for o in status["outputs"]] == [
        "part-00000-of-00002.csv",
        "part-00001-of-00002.csv",
    ]

    def reasons() -> set[str]:
        events = cluster.core.list_namespaced_event(ns, field_selector="involvedObject.name=weekly")
        return {e.reason for e in events.items}

    # kopf posts events in the background, after the status is written.
    wait_for(
        lambda: {"ModelNotFound", "Started", "Completed"} <= reasons(),
        lambda: f"the events, got {reasons()}",
        timeout=60,
    )

    # Re-applying the same object changes nothing: no new generation, the same Job.
    before = cluster.job("weekly")
    assert before is not None
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "weekly", manifest)
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "weekly")
    assert obj["metadata"]["generation"] == 1
    after = cluster.job("weekly")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    # Deleting it removes the Job and, through the Job, its pods.
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "weekly")
    wait_for(lambda: cluster.job("weekly") is None, "the Job to be garbage-collected", timeout=60)
    wait_for(
        lambda: not cluster.core.list_namespaced_pod(ns).items,
        "the shard pods to be garbage-collected",
        timeout=60,
    )


def test_shard_pods_pass_the_restricted_pod_security_standard(
    api: client.ApiClient, control_plane: ControlPlane
) -> None:
    """The API server's Pod Security admission, enforcing `restricted`, admits a shard's pod
    (model, input and output on claims, resources, the pod settings of spec.pod)."""
    bp = parse_batch_prediction(
        default_model_deployment(
            batch_prediction(resources={"limits": {"memory": "1Gi"}}, pod={"labels": {"a": "b"}}),
            BATCH_KIND,
        )
    )
    assert bp.model is not None
    template = render_batch_job(bp, bp.model, server_image="registry.example/s:1")["spec"][
        "template"
    ]
    namespace = f"psa-{uuid.uuid4().hex[:8]}"
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    core = client.CoreV1Api(api)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace, labels=labels))
    )
    try:
        spec = json.loads(json.dumps(template["spec"]))
        # The Job controller sets JOB_COMPLETION_INDEX; PSA does not look at args.
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "shard-0"}, "spec": spec}
        core.create_namespaced_pod(namespace, pod)
    finally:
        core.delete_namespace(namespace)


def test_a_job_the_api_server_refuses_fails_it_once_and_says_why(cluster: Batch) -> None:
    # The CRD passes nodeSelector through as a free-form map; the Job API refuses the key. The
    # spec cannot change, so this is final: Failed, with the API server's words.
    body = batch_prediction("refused", pod={"nodeSelector": {"bad key!": "x"}})
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body)
    status = cluster.wait_phase("refused", "Failed")
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "JobRejected"
    assert "the API server refused the Job" in failed["message"]
    assert "bad key!" in failed["message"]
    assert cluster.job("refused") is None


def test_no_finalizer_so_deletion_never_waits_for_the_operator(cluster: Batch) -> None:
    """The operator removes the finalizer earlier versions left, puts none of its own, and a
    BatchPrediction deleted with the operator gone is gone at once (its Job with it)."""
    custom, ns = cluster.custom, cluster.namespace
    legacy = batch_prediction("legacy")
    legacy["metadata"]["finalizers"] = [naming.LEGACY_FINALIZER]
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, legacy)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, batch_prediction("fresh"))
    for name in ("legacy", "fresh"):
        wait_for(
            lambda name=name: cluster.job(name), f"{name}'s Job", check=cluster.operator.check_alive
        )

    def finalizers(name: str) -> list[str] | None:
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return list(obj["metadata"].get("finalizers") or [])

    wait_for(lambda: finalizers("legacy") == [], "the legacy finalizer removed")
    assert finalizers("fresh") == []
    cluster.operator.kill()
    for name in ("legacy", "fresh"):
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        wait_for(lambda name=name: finalizers(name) is None, f"{name} deleted", timeout=30)
