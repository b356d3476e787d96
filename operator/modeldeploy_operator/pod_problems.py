"""Why a variant's pods do not run, from the pods as the kubelet reports them: a fetch that refused
the model (wrong sha256, unreachable URI), a server that crashes, an image that cannot be pulled,
a pod that cannot be scheduled. The Deployment alone says only "not available" until its progress
deadline (ten minutes by default), and then not why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from modeldeploy_operator import naming

# Waiting reasons that mean the container will not start without a change by someone.
STUCK_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
MESSAGE_LIMIT = 300  # per pod: a condition names the problem, the pod's logs tell the rest


def variant_pod_problems(pods: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """For each variant with a failing pod, what the first such pod says (by variant name)."""
    problems: dict[str, str] = {}
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        meta = pod.get("metadata", {})
        variant = meta.get("labels", {}).get(naming.VARIANT)
        if not variant or variant in problems or meta.get("deletionTimestamp"):
            continue
        problem = pod_problem(pod)
        if problem:
            problems[variant] = f"pod {meta.get('name', '?')}: {problem}"
    return problems


def pod_problem(pod: Mapping[str, Any]) -> str:
    """Why this pod does not run (init or main container failing, unschedulable), or ""."""
    status = pod.get("status", {})
    for condition in status.get("conditions", []):
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return _clip(f"cannot be scheduled: {condition.get('message', '')}")
    for kind, statuses in (
        ("init container", status.get("initContainerStatuses", [])),
        ("container", status.get("containerStatuses", [])),
    ):
        for container in statuses:
            problem = _container_problem(container)
            if problem:
                return _clip(f"{kind} {container.get('name', '?')} {problem}")
    return ""


def _container_problem(container: Mapping[str, Any]) -> str:
    state = container.get("state", {})
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or {}
    last = (container.get("lastState") or {}).get("terminated") or {}
    restarts = int(container.get("restartCount") or 0)
    if terminated and terminated.get("exitCode", 0) != 0:
        return _exited(terminated, restarts)
    if waiting.get("reason") in STUCK_WAITING:
        if last and last.get("exitCode", 0) != 0:
            return _exited(last, restarts)
        detail = waiting.get("message", "")
        return f"{waiting['reason']}{': ' + detail if detail else ''}"
    return ""


def _exited(terminated: Mapping[str, Any], restarts: int) -> str:
    said = " ".join(str(terminated.get("message") or terminated.get("reason") or "").split())
    again = f", {restarts} restart{'s' if restarts > 1 else ''}" if restarts else ""
    return f"failed (exit {terminated.get('exitCode')}{again}): {said or 'no message'}"


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def rollout_incomplete(deployment: Mapping[str, Any]) -> bool:
    """A variant Deployment whose pods are worth reading: some are not available or not updated."""
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    generation = deployment.get("metadata", {}).get("generation", 0)
    desired = int(spec.get("replicas", 1) or 0)
    return (
        status.get("observedGeneration", 0) < generation
        or int(status.get("unavailableReplicas") or 0) > 0
        or int(status.get("updatedReplicas") or 0) < desired
        or int(status.get("availableReplicas") or 0) < desired
    )
