"""The Indexed Job a BatchPrediction wants, as a plain dict: shared by the operator and
`modeldeploy render`.

One index per shard, each running `modeldeploy-server batch --shard $(JOB_COMPLETION_INDEX)/N`
from the server image, after the same `fetch` init container as a variant (so the model is
verified against its sha256 twice, as it is for serving). Each pod reports its shard's manifest
(rows, part sha256) in its termination message, which is how the operator learns the results
without reading the volume.
"""

from __future__ import annotations

import copy
from typing import Any

from modeldeploy_operator import naming
from modeldeploy_operator.contract import BATCH_RUN_ID_ENV, BATCH_RUN_NAME_ENV
from modeldeploy_operator.render import (
    MODEL_DIR,
    MODEL_PATH,
    MODEL_SOURCE_DIR,
    container_security_context,
    render_pod_spec,
)
from modeldeploy_operator.spec import (
    BATCH_KIND,
    MODEL_DEPLOYMENT_API_VERSION,
    BatchPrediction,
    ModelDeployment,
    ModelSource,
)

Manifest = dict[str, Any]

BATCH_PREDICTION_LABEL = "modeldeploy.dev/batch-prediction"
COMPONENT_BATCH = "batch"
CONTAINER = "batch"
OUTPUT_DIR = "/output"
INPUT_DIR = "/input"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MODEL_URI_ANNOTATION = "modeldeploy.dev/model-uri"
MODEL_SHA256_ANNOTATION = "modeldeploy.dev/model-sha256"
# `modeldeploy-server batch` exits 1 when the input, the model or the output is wrong and 2 when
# its configuration is: a retry would fail the same way, so the index fails at once. Exit 3 (the
# input could not be read: network, volume) and anything else (OOM kill, eviction) are retried.
PERMANENT_EXIT_CODES = (1, 2)
# No drain: SIGTERM stops a shard, which removes its partial output and is retried.
GRACE_SECONDS = 30


def batch_labels(name: str) -> dict[str, str]:
    """Labels of a BatchPrediction's Job and pods; the operator selects on the first two."""
    return {
        naming.MANAGED_BY: naming.FIELD_MANAGER,
        BATCH_PREDICTION_LABEL: name,
        naming.NAME: "modeldeploy-server",
        naming.INSTANCE: name,
        naming.COMPONENT: COMPONENT_BATCH,
        naming.PART_OF_LABEL: naming.PART_OF,
    }


def batch_selector(name: str) -> str:
    """Label selector of a BatchPrediction's Job and pods."""
    return f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},{BATCH_PREDICTION_LABEL}={name}"


class UnresolvedModel(Exception):
    """The BatchPrediction's model reference names no variant that exists (yet)."""


def resolve_model(bp: BatchPrediction, md: ModelDeployment | None) -> ModelSource:
    """The model to score with: the given one, or the referenced variant's (uri and sha256)."""
    if bp.model is not None:
        return bp.model
    ref = bp.model_ref
    assert ref is not None  # parse_batch_prediction sets one of the two
    if md is None or md.name != ref.name:
        raise UnresolvedModel(f"ModelDeployment {ref.name!r} does not exist in {bp.namespace!r}")
    for variant in md.variants:
        if variant.name == ref.variant:
            return variant.model
    raise UnresolvedModel(
        f"ModelDeployment {ref.name!r} has no variant {ref.variant!r} (it has "
        f"{[v.name for v in md.variants]})"
    )


def render_batch_job(bp: BatchPrediction, model: ModelSource, *, server_image: str) -> Manifest:
    """The Job of a BatchPrediction scoring with `model` (given, or resolved from its variant)."""
    image = bp.pod.image or server_image
    volumes: list[Manifest] = [
        {"name": "models", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    claims: dict[str, str] = {}

    def claim_volume(claim: str, name: str, read_only: bool) -> str:
        # One volume per claim, even when the model, the input and the output share it.
        if claim not in claims:
            claims[claim] = name
            source = {"claimName": claim, **({"readOnly": True} if read_only else {})}
            volumes.append({"name": name, "persistentVolumeClaim": source})
        return claims[claim]

    output_claim, output_dir = bp.output_claim_and_dir
    batch_mounts: list[Manifest] = [
        {"name": "models", "mountPath": MODEL_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": claim_volume(output_claim, "output", False), "mountPath": OUTPUT_DIR},
    ]
    fetch_mounts: list[Manifest] = [
        {"name": "models", "mountPath": MODEL_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    model_source = model.uri
    if model.scheme == "pvc":
        claim, path = model.pvc_claim_and_path
        volume = claim_volume(claim, "model-source", True)
        fetch_mounts.append({"name": volume, "mountPath": MODEL_SOURCE_DIR, "readOnly": True})
        model_source = f"{MODEL_SOURCE_DIR}/{path}"
    input_source = bp.input_uri
    if input_source.startswith("pvc://"):
        claim, _, path = input_source.removeprefix("pvc://").partition("/")
        volume = claim_volume(claim, "input", True)
        batch_mounts.append({"name": volume, "mountPath": INPUT_DIR, "readOnly": True})
        input_source = f"{INPUT_DIR}/{path}"
    resources = {"resources": copy.deepcopy(dict(bp.resources))} if bp.resources else {}
    fetch = {
        "name": "fetch-model",
        "image": image,
        "command": ["modeldeploy-server"],
        "args": ["fetch", model_source, MODEL_PATH, "--sha256", model.sha256],
        **resources,
        "securityContext": container_security_context(),
        "volumeMounts": fetch_mounts,
    }
    env = [
        ("MODELDEPLOY_MODEL_PATH", MODEL_PATH),
        ("MODELDEPLOY_MODEL_SHA256", model.sha256),
        ("MODELDEPLOY_BATCH_INPUT", input_source),
        *([("MODELDEPLOY_BATCH_INPUT_SHA256", bp.input_sha256)] if bp.input_sha256 else []),
        ("MODELDEPLOY_BATCH_OUTPUT", f"{OUTPUT_DIR}/{output_dir}".rstrip("/")),
        ("MODELDEPLOY_BATCH_FORMAT", bp.file_format),
        ("MODELDEPLOY_BATCH_ROWS", str(bp.batch_rows)),
        ("MODELDEPLOY_BATCH_ON_ERROR", bp.on_error),
        ("MODELDEPLOY_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH),
        # The run: the last shard to finish writes manifest.json from this uid's part manifests.
        *([(BATCH_RUN_ID_ENV, bp.uid), (BATCH_RUN_NAME_ENV, bp.name)] if bp.uid else []),
    ]
    batch = {
        "name": CONTAINER,
        "image": image,
        "command": ["modeldeploy-server"],
        # The Job controller sets JOB_COMPLETION_INDEX in each pod; the kubelet expands $(VAR)
        # in args from the container's environment.
        "args": ["batch", "--shard", f"$(JOB_COMPLETION_INDEX)/{bp.shards}"],
        "env": [{"name": name, "value": value} for name, value in env],
        **resources,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": batch_mounts,
    }
    pod_spec = render_pod_spec(
        bp.pod, init_containers=[fetch], containers=[batch], volumes=volumes, drain_seconds=0
    )
    pod_spec["restartPolicy"] = "Never"
    pod_spec["terminationGracePeriodSeconds"] = GRACE_SECONDS
    labels = batch_labels(bp.name)
    template_metadata: Manifest = {"labels": {**(bp.pod.labels or {}), **labels}}
    if bp.pod.annotations:
        template_metadata["annotations"] = dict(bp.pod.annotations)
    spec: Manifest = {
        "completionMode": "Indexed",
        "completions": bp.shards,
        "parallelism": bp.parallelism,
        "backoffLimitPerIndex": bp.retries_per_shard,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailIndex",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": list(PERMANENT_EXIT_CODES),
                    },
                },
                # Evictions and preemptions are not the shard's fault: retried, not counted.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": {"metadata": template_metadata, "spec": pod_spec},
    }
    metadata: Manifest = {
        "name": bp.name,
        "namespace": bp.namespace,
        "labels": {**labels, naming.MODEL_DIGEST: naming.model_digest_label(model.sha256)},
        # The model the Job runs, for the status: a ModelDeployment may since have moved on.
        "annotations": {MODEL_URI_ANNOTATION: model.uri, MODEL_SHA256_ANNOTATION: model.sha256},
    }
    if bp.uid is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": MODEL_DEPLOYMENT_API_VERSION,
                "kind": BATCH_KIND,
                "name": bp.name,
                "uid": bp.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}
