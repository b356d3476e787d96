"""Gate and probe Jobs, pure: the Job that runs `modeldeploy-server gate` for one variant at one
model digest against its Service (the real serving path), the verdicts read back from the
termination messages of those Jobs' pods, and the Job that sends a rollout window's probe traffic
(`modeldeploy-server probe`, a gated variant's dataset through the router).

A Job's name carries the digest, so a new model gets a new gate; a verdict counts only for the
digest its pod's label names. Exit 0 (passed) and 1 (failed) are verdicts; exit 2 (cannot judge:
the Service unreachable, the dataset unreadable) is retried by the Job, and gives no verdict.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from modeldeploy_operator import naming
from modeldeploy_operator.render import (
    _object,
    container_security_context,
    render_objects,
    render_pod_spec,
)
from modeldeploy_operator.rollout import GateVerdict, ProbeRun
from modeldeploy_operator.spec import Gate, ModelDeployment, Shadow, Variant

Manifest = dict[str, Any]
CONTAINER = "gate"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
FAILED_EXIT_CODE = 1  # a verdict: retrying would judge the same model the same way
BACKOFF_LIMIT = 3
GRACE_SECONDS = 10
DATASET_DIR = "/dataset"


def gate_job_name(md_name: str, variant: str, sha256: str) -> str:
    """`<md>-<variant>-gate-<digest prefix>`, within the 63 characters of a label value (the Job
    controller labels its pods with the Job's name)."""
    suffix = f"-gate-{sha256[:10]}"
    base = naming.variant_object_name(md_name, variant)[: naming.MAX_NAME_LENGTH - len(suffix)]
    return base.rstrip("-") + suffix


def gate_labels(md_name: str, variant: str, sha256: str) -> dict[str, str]:
    return {
        **naming.common_labels(md_name, naming.COMPONENT_GATE),
        naming.VARIANT: variant,
        naming.MODEL_DIGEST: naming.model_digest_label(sha256),
    }


def dataset_args(gate: Gate) -> list[str]:
    """The dataset arguments of `gate` and `probe` (a pvc:// dataset is read where the Job
    mounts its claim)."""
    dataset = gate.dataset.uri
    if gate.dataset.scheme == "pvc":
        dataset = f"{DATASET_DIR}/{gate.dataset.pvc_claim_and_path[1]}"
    return ["--dataset", dataset, "--sha256", gate.dataset.sha256, "--format", gate.format]


def gate_args(md: ModelDeployment, variant: Variant) -> list[str]:
    """`modeldeploy-server gate` arguments for `variant`'s gate, against its Service."""
    gate = variant.gate
    assert gate is not None
    args = [
        "gate",
        *dataset_args(gate),
        "--url",
        naming.variant_service_url(md.name, variant.name, md.namespace),
        "--model-name",
        md.name,
        "--model-sha256",
        variant.model.sha256,
        "--atol",
        repr(gate.absolute_tolerance),
        "--rtol",
        repr(gate.relative_tolerance),
        "--min-agreement",
        repr(gate.min_agreement),
        "--termination-message-path",
        TERMINATION_MESSAGE_PATH,
    ]
    if gate.against is not None:
        args += ["--baseline-url", naming.variant_service_url(md.name, gate.against, md.namespace)]
    for output in gate.outputs:
        args += ["--compare", output]
    return args


def probe_dataset(md: ModelDeployment, probes: ProbeRun) -> Gate:
    """The gate whose dataset the probes send: the first probed gated variant's, else the first
    gated variant's (the spec has one: parse_model_deployment checks)."""
    gated = {v.name: v.gate for v in md.variants if v.gate is not None}
    name = next((n for n in probes.variants if n in gated), next(iter(gated)))
    return gated[name]


def probe_args(md: ModelDeployment, probes: ProbeRun, router_url: str) -> list[str]:
    """`modeldeploy-server probe` arguments for one window's probe traffic through the router."""
    args = ["probe", *dataset_args(probe_dataset(md, probes)), "--url", router_url]
    args += ["--model-name", md.name, "--header-override", md.routing.header_override]
    if md.uid is not None:
        args += ["--probe-token", naming.probe_token(md.uid)]
    for name in probes.variants:
        args += ["--variant", name]
    return [
        *args,
        "--rate",
        str(probes.requests_per_second),
        "--duration-s",
        str(probes.seconds),
    ]


def probe_job_name(md_name: str, key: str) -> str:
    """`<md>-probe-<window key>`: one Job per window's probe traffic."""
    suffix = f"-probe-{key}"
    return md_name[: naming.MAX_NAME_LENGTH - len(suffix)].rstrip("-") + suffix


def render_probe_job(md: ModelDeployment, probes: ProbeRun, image: str) -> Manifest:
    """The Job that sends one window's probe traffic (it ends with the window; the plan prunes
    it when the window is over)."""
    labels = naming.common_labels(md.name, naming.COMPONENT_PROBE)
    args = probe_args(md, probes, naming.router_url(md.name, md.namespace))
    spec: Manifest = {
        "backoffLimit": 0,
        # Bounded even if the process were stuck: the window's length and a grace minute.
        "activeDeadlineSeconds": probes.seconds + 60,
        "template": {"metadata": {"labels": labels}},
    }
    name = probe_job_name(md.name, probes.key)
    return _dataset_job(md, name, labels, args, spec, image, probe_dataset(md, probes))


def render_gate_job(md: ModelDeployment, variant: Variant, image: str) -> Manifest:
    """The Job that gates `variant` at its current model digest."""
    sha256 = variant.model.sha256
    labels = gate_labels(md.name, variant.name, sha256)
    spec: Manifest = {
        "backoffLimit": BACKOFF_LIMIT,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [FAILED_EXIT_CODE],
                    },
                }
            ]
        },
        "template": {"metadata": {"labels": labels}},
    }
    name = gate_job_name(md.name, variant.name, sha256)
    assert variant.gate is not None
    return _dataset_job(md, name, labels, gate_args(md, variant), spec, image, variant.gate)


def _dataset_job(
    md: ModelDeployment,
    name: str,
    labels: Mapping[str, str],
    args: list[str],
    spec: Manifest,
    image: str,
    gate: Gate,
) -> Manifest:
    """A Job running `modeldeploy-server ARGS` with `gate`'s dataset at hand: `spec` with the
    pod template's spec filled in."""
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    container: Manifest = {
        "name": CONTAINER,
        "image": image,
        "command": ["modeldeploy-server"],
        "args": args,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
        # The dataset is downloaded into a temporary directory.
        "volumeMounts": mounts,
    }
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    if gate.dataset.scheme == "pvc":
        claim = {"claimName": gate.dataset.pvc_claim_and_path[0], "readOnly": True}
        volumes.append({"name": "dataset", "persistentVolumeClaim": claim})
        mounts.append({"name": "dataset", "mountPath": DATASET_DIR, "readOnly": True})
    pod_spec = render_pod_spec(
        md.pod, init_containers=[], containers=[container], volumes=volumes, drain_seconds=0
    )
    pod_spec["restartPolicy"] = "Never"
    pod_spec["terminationGracePeriodSeconds"] = GRACE_SECONDS
    spec["template"]["spec"] = pod_spec
    return _object(md, "batch/v1", "Job", name, dict(labels), spec)


def render_with_gates(
    md: ModelDeployment,
    *,
    server_image: str,
    weights: Mapping[str, int] | None = None,
    serving: Collection[str] | None = None,
    probes: ProbeRun | None = None,
    mirror: Shadow | None = None,
) -> list[Manifest]:
    """render_objects, then the gate Job of each gated variant that serves (`serving`; None, as
    offline: every variant), and the probe Job of the rollout's current window, if any; `mirror`:
    see render_objects."""
    image = md.pod.image or server_image
    jobs = [
        render_gate_job(md, v, image)
        for v in md.variants
        if v.gate is not None and (serving is None or v.name in serving)
    ]
    if probes is not None:
        jobs.append(render_probe_job(md, probes, image))
    objects = render_objects(md, server_image=server_image, weights=weights, mirror=mirror)
    return [*objects, *jobs]


def gate_verdicts(
    md: ModelDeployment,
    pods: Iterable[Mapping[str, Any]],
    jobs: Iterable[Mapping[str, Any]] = (),
) -> dict[str, GateVerdict]:
    """The verdict of each gated variant's gate at its current digest, from its Job's pods; a Job
    that failed without any (its retries spent on "cannot judge") fails the gate: a candidate
    whose gate cannot run gets no weight, and the status says why."""
    current = {v.name: v.model.sha256 for v in md.variants if v.gate is not None}
    verdicts: dict[str, GateVerdict] = {}
    for pod in pods:
        labels = pod.get("metadata", {}).get("labels") or {}
        variant = labels.get(naming.VARIANT, "")
        sha256 = current.get(variant)
        if (
            labels.get(naming.COMPONENT) != naming.COMPONENT_GATE
            or sha256 is None
            or labels.get(naming.MODEL_DIGEST) != naming.model_digest_label(sha256)
        ):
            continue
        verdict = _verdict(pod, sha256)
        if verdict is not None:
            verdicts[variant] = verdict
    by_name = {j["metadata"]["name"]: j for j in jobs}
    for name, sha256 in current.items():
        job_name = gate_job_name(md.name, name, sha256)
        job = by_name.get(job_name)
        failed = _failed(job) if job is not None else None
        if name not in verdicts and failed is not None:
            summary = f"gate Job {job_name} failed without a verdict: {failed}"
            verdicts[name] = GateVerdict(sha256, False, summary)
    return verdicts


def _failed(job: Mapping[str, Any]) -> str | None:
    """The Job's Failed condition's reason and message, or None while it has not failed."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return None


def _verdict(pod: Mapping[str, Any], sha256: str) -> GateVerdict | None:
    for status in pod.get("status", {}).get("containerStatuses", []):
        if status.get("name") != CONTAINER:
            continue
        terminated = (status.get("state") or {}).get("terminated") or {}
        return verdict_of(terminated.get("exitCode"), terminated.get("message") or "", sha256)
    return None


def verdict_of(exit_code: Any, message: str, sha256: str) -> GateVerdict | None:
    """The verdict of a gate run that ended with `exit_code` and wrote `message` (its
    termination message), for model digest `sha256`; None when it gave none (exit 2)."""
    if exit_code not in (0, FAILED_EXIT_CODE):
        return None
    try:
        document = json.loads(message)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("passed"), bool):
        return None
    summary = (
        f"gate {'passed' if document['passed'] else 'FAILED'}: {document.get('agreed')}/"
        f"{document.get('rows')} rows agree (need {document.get('minAgreement', '?')})"
    )
    return GateVerdict(sha256, document["passed"], summary)
