"""A BatchPrediction's status, computed whole from its Job and the Job's pods.

Each shard's pod reports its manifest (rows, part sha256, input and model digests) or its error
as a JSON termination message; the Job says which indexes succeeded and failed. Pure: the clock
comes in as `now`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from modeldeploy_operator.batch_render import (
    CONTAINER,
    MODEL_SHA256_ANNOTATION,
    MODEL_URI_ANNOTATION,
)
from modeldeploy_operator.spec import BatchPrediction
from modeldeploy_operator.status import Event, render_conditions

Status = dict[str, Any]
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PHASES = ("Pending", "Running", "Succeeded", "Failed")
_MESSAGE_LIMIT = 300


def parse_indexes(text: str | None) -> list[int]:
    """A Job's completedIndexes/failedIndexes, `"0-2,5"` -> [0, 1, 2, 5]."""
    indexes: list[int] = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        first, _, last = part.partition("-")
        indexes.extend(range(int(first), int(last or first) + 1))
    return indexes


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for container in pod.get("status", {}).get("containerStatuses", []):
        if container.get("name") == CONTAINER:
            terminated: Mapping[str, Any] | None = container.get("state", {}).get("terminated")
            return terminated
    return None


def _index(pod: Mapping[str, Any]) -> int | None:
    value = pod.get("metadata", {}).get("annotations", {}).get(INDEX_ANNOTATION)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def shard_reports(
    pods: Sequence[Mapping[str, Any]],
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Per index: the manifest of the pod that succeeded, and the error of the last that failed."""
    manifests: dict[int, dict[str, Any]] = {}
    errors: dict[int, tuple[str, str]] = {}
    for pod in pods:
        index, terminated = _index(pod), _terminated(pod)
        if index is None or terminated is None:
            continue
        message = str(terminated.get("message") or "")
        try:
            report = json.loads(message)
        except ValueError:
            report = None
        if terminated.get("exitCode") == 0 and isinstance(report, dict) and "part" in report:
            manifests[index] = report
            continue
        if isinstance(report, dict) and isinstance(report.get("error"), str):
            reason = report["error"]
        else:
            # FallbackToLogsOnError: the end of the log; or killed without a word.
            reason = message.strip() or str(terminated.get("reason") or "no message")
        finished = str(terminated.get("finishedAt") or "")
        if index not in errors or finished >= errors[index][0]:
            errors[index] = (finished, reason[-_MESSAGE_LIMIT:])
    return manifests, {index: reason for index, (_, reason) in errors.items()}


def _seconds_between(start: str, end: str) -> float:
    def parse(text: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))

    return (parse(end) - parse(start)).total_seconds()


def _job_condition(job: Mapping[str, Any], type_: str) -> bool:
    conditions = job.get("status", {}).get("conditions", [])
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions)


def compute_batch_status(
    bp: BatchPrediction,
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    problem: tuple[str, str] | None,
    previous: Mapping[str, Any] | None,
    now: str,
) -> Status:
    """The whole status; `problem` (reason, message) says why there is no Job: ModelNotFound
    (waits for the model) or JobRejected (the API server refused the Job: final, as the spec
    cannot change)."""
    status: Status = {"observedGeneration": bp.generation, "shards": bp.shards}
    if job is None:
        reason, message = problem or ("JobPending", "no Job yet")
        rejected = reason == "JobRejected"
        status |= {"phase": "Failed" if rejected else "Pending", "shardsSucceeded": 0}
        status |= {"shardsFailed": 0, "shardsDone": f"0/{bp.shards}"}
        status["conditions"] = render_conditions(
            [
                ("Complete", "False", reason, message),
                ("Failed", "True" if rejected else "False", reason, message),
            ],
            bp.generation,
            previous,
            now,
        )
        return status
    job_status = job.get("status", {})
    succeeded = parse_indexes(job_status.get("completedIndexes"))
    failed = parse_indexes(job_status.get("failedIndexes"))
    manifests, errors = shard_reports(pods)
    reports = [manifests[i] for i in sorted(manifests) if i in succeeded]
    annotations = job.get("metadata", {}).get("annotations", {})
    if _job_condition(job, "Complete"):
        phase = "Succeeded"
    elif _job_condition(job, "Failed"):
        phase = "Failed"
    else:
        # The Job controller sets startTime when it starts creating pods.
        phase = "Running" if job_status.get("startTime") else "Pending"
    rows_in = sum(int(r.get("rowsIn", 0)) for r in reports)
    status |= {
        "phase": phase,
        "job": job.get("metadata", {}).get("name", bp.name),
        "shardsSucceeded": len(succeeded),
        "shardsFailed": len(failed),
        "shardsDone": f"{len(succeeded)}/{bp.shards}",
        "rowsIn": rows_in,
        "rowsOut": sum(int(r.get("rowsOut", 0)) for r in reports),
        "rowsSkipped": sum(int(r.get("rowsSkipped", 0)) for r in reports),
        "modelSha256": annotations.get(MODEL_SHA256_ANNOTATION, ""),
        "modelUri": annotations.get(MODEL_URI_ANNOTATION, ""),
    }
    start = job_status.get("startTime")
    end = job_status.get("completionTime")
    if start:
        status["startTime"] = start
        elapsed = _seconds_between(start, end or now)
        status["rowsPerSecond"] = f"{rows_in / elapsed:.1f}" if elapsed > 0 else "0.0"
    if end:
        status["completionTime"] = end
    elif phase == "Failed":
        failed_at = [c for c in job_status.get("conditions", []) if c.get("type") == "Failed"]
        if failed_at and failed_at[0].get("lastTransitionTime"):
            status["completionTime"] = failed_at[0]["lastTransitionTime"]
    input_digests = {r.get("input", {}).get("sha256") for r in reports} - {None}
    if len(input_digests) == 1:
        status["inputSha256"] = input_digests.pop()
    status["outputs"] = [
        {
            "shard": index,
            "name": report["part"]["name"],
            "bytes": report["part"]["bytes"],
            "sha256": report["part"]["sha256"],
            "rows": report.get("rowsOut", 0),
            "skippedRows": report.get("rowsSkipped", 0),
        }
        for index, report in sorted(manifests.items())
        if index in succeeded
    ]
    failures = "; ".join(
        f"shard {index}: {errors.get(index, 'failed')}" for index in sorted(failed)
    )
    complete = ("True", "Completed", f"{len(succeeded)} shard(s), {status['rowsOut']} rows")
    if phase != "Succeeded":
        complete = ("False", phase, f"{len(succeeded)}/{bp.shards} shards done")
    failed_condition = (
        ("True", "ShardsFailed", failures)
        if phase == "Failed"
        else ("False", "NoShardFailed" if not failed else "ShardsFailing", failures or "none")
    )
    status["conditions"] = render_conditions(
        [("Complete", *complete), ("Failed", *failed_condition)], bp.generation, previous, now
    )
    return status


def compute_batch_events(
    previous: Mapping[str, Any] | None, status: Mapping[str, Any]
) -> list[Event]:
    """Events for phase transitions (and why a BatchPrediction waits for its model)."""
    before = (previous or {}).get("phase")
    phase = status.get("phase")
    if phase == before:
        return []
    if phase == "Running":
        return [Event("Normal", "Started", f"Job {status.get('job')}: {status['shards']} shard(s)")]
    if phase == "Succeeded":
        message = (
            f"{status['rowsOut']} rows predicted in {status['shards']} shard(s) with model "
            f"sha256 {status.get('modelSha256')}"
        )
        return [Event("Normal", "Completed", message)]
    if phase == "Failed":
        (failed,) = [c for c in status["conditions"] if c["type"] == "Failed"]
        reason = "JobRejected" if failed["reason"] == "JobRejected" else "Failed"
        return [Event("Warning", reason, failed["message"])]
    (complete,) = [c for c in status["conditions"] if c["type"] == "Complete"]
    if complete["reason"] == "ModelNotFound":
        return [Event("Warning", "ModelNotFound", complete["message"])]
    return []
