"""The ModelDeployment spec as frozen data, parsed once from the custom resource's plain dict.

The CRD's schema and CEL rules refuse most mistakes at admission; `parse_model_deployment` re-checks
the few invariants the rest of the code relies on (so offline `modeldeploy render` is safe too) and
the ones admission cannot see, such as names that would not fit the objects derived from them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from modeldeploy_operator.naming import MAX_NAME_LENGTH, RESERVED_LABELS, variant_object_name

API_GROUP = "modeldeploy.dev"
API_VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
BATCH_KIND = "BatchPrediction"
BATCH_PLURAL = "batchpredictions"
MODEL_DEPLOYMENT_API_VERSION = f"{API_GROUP}/{API_VERSION}"

DEFAULT_HEADER_OVERRIDE = "x-model-variant"
EXAMPLE_ANNOTATION = "modeldeploy.dev/example-instance"
ROLLOUT_COMMAND_ANNOTATION = f"{API_GROUP}/rollout-command"
DEFAULT_NAMESPACE = "default"
URI_SCHEMES = ("https", "http", "file", "pvc")
RoutingMode = Literal["router", "gateway", "none"]
ROUTING_MODES: tuple[RoutingMode, ...] = ("router", "gateway", "none")

# Kubernetes object names derived from the ModelDeployment: Services need DNS-1035 labels.
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")

T = TypeVar("T")
D = TypeVar("D")
N = TypeVar("N", int, float)


class InvalidSpecError(ValueError):
    """A ModelDeployment that cannot be turned into objects; the message names the field."""


@dataclass(frozen=True)
class ModelSource:
    uri: str
    sha256: str

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0]

    @property
    def pvc_claim_and_path(self) -> tuple[str, str]:
        """`pvc://claim/dir/model.onnx` -> ("claim", "dir/model.onnx")."""
        claim, _, path = self.uri.removeprefix("pvc://").partition("/")
        return claim, path


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int
    max_replicas: int
    target_cpu_utilization_percentage: int


@dataclass(frozen=True)
class ServerSettings:
    """Optional `modeldeploy-server serve` settings; None leaves the server's own default."""

    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    intra_op_threads: int | None = None
    max_request_bytes: int | None = None
    max_rows: int | None = None
    request_timeout_seconds: float | None = None


GateFormat = Literal["csv", "jsonl"]
GATE_FORMATS: tuple[GateFormat, ...] = ("csv", "jsonl")


@dataclass(frozen=True)
class Gate:
    """A golden dataset a variant must answer well before it gets live weight."""

    dataset: ModelSource
    format: GateFormat = "csv"
    # Another variant whose answers to compare with; None: the dataset's expected answers.
    against: str | None = None
    outputs: tuple[str, ...] = ()
    absolute_tolerance: float = 0.0
    relative_tolerance: float = 0.0
    min_agreement: float = 1.0


@dataclass(frozen=True)
class Bound:
    """A limit on a candidate's metric: absolute, relative to the stable variants', or both."""

    max: float | None = None
    max_ratio_to_stable: float | None = None


@dataclass(frozen=True)
class Analysis:
    """What a candidate's metrics over a step's window must stay within."""

    error_rate: Bound = Bound()
    p99_latency_ms: Bound = Bound()
    shadow_disagreement: Bound = Bound()
    # Prometheus' base URL to read the metrics from; None: the operator's default source.
    prometheus_url: str | None = None


@dataclass(frozen=True)
class RolloutStep:
    """One step: the share of the way from the traffic flowing when the rollout began to the
    spec's weights (percent), held for hold_seconds."""

    percent: int
    hold_seconds: int


@dataclass(frozen=True)
class Probes:
    """Probe traffic for a step whose users are short of samples: rows of a gated variant's
    golden dataset sent through the router to the candidates and the stable variants."""

    requests_per_second: int


@dataclass(frozen=True)
class ShadowStep:
    """A step before the candidate gets any weight: the router mirrors `percent` of the traffic
    to it for hold_seconds and compares its answers with the stable variants'."""

    percent: int
    hold_seconds: int
    tolerance: float | None = None  # None: the router's default


MIN_PROBE_RATE, MAX_PROBE_RATE = 1, 100  # requests a second
LowTrafficPolicy = Literal["hold", "rollback", "promote"]
LOW_TRAFFIC_POLICIES: tuple[LowTrafficPolicy, ...] = ("hold", "rollback", "promote")


@dataclass(frozen=True)
class Rollout:
    """How a new spec generation's weights are reached: steps judged on live metrics."""

    steps: tuple[RolloutStep, ...] = ()
    analysis: Analysis = Analysis()
    # Requests each candidate must have answered in a step's window before it is judged.
    min_samples: int = 100
    # Failed analyses tolerated before rolling back.
    failure_limit: int = 0
    low_traffic: LowTrafficPolicy = "hold"
    interval_seconds: int = 30
    deadline_seconds: int | None = None
    probes: Probes | None = None
    shadow: ShadowStep | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    model: ModelSource
    weight: int
    replicas: int
    autoscaling: Autoscaling | None
    resources: Mapping[str, Any]
    server: ServerSettings
    gate: Gate | None = None

    @property
    def min_replicas(self) -> int:
        """The replica count the variant never goes below (what a PodDisruptionBudget protects)."""
        return self.autoscaling.min_replicas if self.autoscaling else self.replicas


@dataclass(frozen=True)
class GatewaySettings:
    parent_refs: tuple[Mapping[str, Any], ...]
    hostnames: tuple[str, ...]
    path_prefix: str


@dataclass(frozen=True)
class Routing:
    mode: RoutingMode
    header_override: str
    gateway: GatewaySettings | None
    # Lower-case header whose value keeps a client on one variant (router mode only).
    sticky_header: str | None = None
    shadow: Shadow | None = None
    # How long the router waits for a variant's answer (router mode only); None: derived.
    timeout_seconds: int | None = None


@dataclass(frozen=True)
class Shadow:
    variant: str
    percent: int
    tolerance: float | None  # router mode only; None: the router's default


@dataclass(frozen=True)
class PodSettings:
    image: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    labels: Mapping[str, str] | None = None
    annotations: Mapping[str, str] | None = None


@dataclass(frozen=True)
class ModelDeployment:
    name: str
    namespace: str
    uid: str | None  # None when rendered offline, before the object exists in a cluster
    generation: int
    variants: tuple[Variant, ...]
    routing: Routing
    pod: PodSettings
    # From annotation modeldeploy.dev/example-instance: the servers' warm-up request and the row
    # of local mode's printed example requests.
    example_instance: Mapping[str, Any] | None = None
    # How the spec's weights are reached (rollout.py); None: routed directly.
    rollout: Rollout | None = None
    # Annotation modeldeploy.dev/rollout-command: a person's pause/resume/promote/abort ("" none).
    rollout_command: str = ""

    @property
    def spec_weights(self) -> tuple[tuple[str, int], ...]:
        return tuple((v.name, v.weight) for v in self.variants)


def parse_model_deployment(obj: Mapping[str, Any]) -> ModelDeployment:
    """Parse a ModelDeployment (a plain dict, as the API server stores it), applying defaults."""
    obj = copy.deepcopy(dict(obj))  # the frozen result must not share mutable parts with the input
    metadata = _optional(obj, "metadata", "", dict, {})
    spec = _required(obj, "spec", "", dict)
    name = _required(metadata, "name", "metadata", str)
    if not _DNS1035_LABEL.match(name):
        raise InvalidSpecError(
            f"metadata.name: {name!r} must be a DNS-1035 label (lowercase letters, digits and '-', "
            "starting with a letter) because it names the router Service"
        )
    raw_variants = _required(spec, "variants", "spec", list)
    if not raw_variants:
        raise InvalidSpecError("spec.variants: at least one variant is required")
    variants = tuple(
        _parse_variant(_as(raw, f"spec.variants[{i}]", dict), f"spec.variants[{i}]", name)
        for i, raw in enumerate(raw_variants)
    )
    _check_variants(variants)
    routing = _parse_routing(_optional(spec, "routing", "spec", dict, {}))
    annotations = _optional(metadata, "annotations", "metadata", dict, {})
    if routing.shadow is not None:
        shadow = next((v for v in variants if v.name == routing.shadow.variant), None)
        if shadow is None or shadow.weight != 0:
            raise InvalidSpecError(
                f"spec.routing.shadow.variant: {routing.shadow.variant!r} must name a variant "
                "with weight 0"
            )
    rollout = _parse_rollout(spec)
    if rollout is not None and rollout.shadow is not None:
        if routing.mode != "router":
            raise InvalidSpecError("spec.rollout.shadow: needs routing mode router")
        if rollout.analysis.shadow_disagreement.max is None:
            raise InvalidSpecError(
                "spec.rollout.shadow: needs spec.rollout.analysis.shadowDisagreement.max"
            )
    if rollout is not None and rollout.probes is not None:
        if routing.mode != "router":
            raise InvalidSpecError("spec.rollout.probes: needs routing mode router")
        if not any(v.gate is not None for v in variants):
            raise InvalidSpecError(
                "spec.rollout.probes: needs a variant with a gate (probes send its dataset)"
            )
    return ModelDeployment(
        name=name,
        namespace=_optional(metadata, "namespace", "metadata", str, DEFAULT_NAMESPACE),
        uid=_optional(metadata, "uid", "metadata", str, None),
        generation=_optional(metadata, "generation", "metadata", int, 1),
        variants=variants,
        routing=routing,
        pod=_parse_pod(_optional(spec, "pod", "spec", dict, {})),
        example_instance=parse_example_instance(annotations),
        rollout=rollout,
        rollout_command=str(annotations.get(ROLLOUT_COMMAND_ANNOTATION, "")),
    )


def parse_example_instance(annotations: Mapping[str, Any]) -> dict[str, Any] | None:
    """The example records instance from the ModelDeployment's annotation, if it is usable."""
    text = annotations.get(EXAMPLE_ANNOTATION)
    if not isinstance(text, str):
        return None
    try:
        instance = json.loads(text)
    except ValueError:
        return None
    return instance if isinstance(instance, dict) else None


def _parse_variant(raw: Mapping[str, Any], path: str, md_name: str) -> Variant:
    name = _required(raw, "name", path, str)
    if not _DNS1035_LABEL.match(name):
        raise InvalidSpecError(f"{path}.name: {name!r} must be a DNS-1035 label")
    object_name = variant_object_name(md_name, name)
    if len(object_name) > MAX_NAME_LENGTH:
        raise InvalidSpecError(
            f"{path}.name: the Service name {object_name!r} (<name>-<variant>) is "
            f"{len(object_name)} characters; the limit is {MAX_NAME_LENGTH}"
        )
    model = _required(raw, "model", path, dict)
    source = ModelSource(
        uri=_required(model, "uri", f"{path}.model", str),
        sha256=_required(model, "sha256", f"{path}.model", str),
    )
    _check_model(source, f"{path}.model")
    weight = _required(raw, "weight", path, int)
    if not 0 <= weight <= 100:
        raise InvalidSpecError(f"{path}.weight: {weight} is outside 0..100")
    replicas = _optional(raw, "replicas", path, int, 1)
    if replicas < 0:
        raise InvalidSpecError(f"{path}.replicas: {replicas} must not be negative")
    return Variant(
        name=name,
        model=source,
        weight=weight,
        replicas=replicas,
        autoscaling=_parse_autoscaling(raw, path),
        resources=_optional(raw, "resources", path, dict, {}),
        server=_parse_server(_optional(raw, "server", path, dict, {}), f"{path}.server"),
        gate=_parse_gate(raw, path),
    )


def _check_model(model: ModelSource, path: str) -> None:
    if not _SHA256.match(model.sha256):
        raise InvalidSpecError(f"{path}.sha256: must be 64 lowercase hex characters")
    if model.scheme not in URI_SCHEMES or "://" not in model.uri:
        raise InvalidSpecError(
            f"{path}.uri: {model.uri!r} must start with one of "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    if model.scheme == "file" and not model.uri.startswith("file:///"):
        raise InvalidSpecError(f"{path}.uri: a file:// URI needs an absolute path (file:///...)")
    if model.scheme == "pvc":
        claim, file_path = model.pvc_claim_and_path
        if not _DNS1123_SUBDOMAIN.match(claim) or not file_path or file_path.endswith("/"):
            raise InvalidSpecError(
                f"{path}.uri: {model.uri!r} must be pvc://<claim>/<path to the model file>"
            )
        if ".." in file_path.split("/"):
            raise InvalidSpecError(f"{path}.uri: the path inside the claim must not contain '..'")


def _parse_gate(raw: Mapping[str, Any], path: str) -> Gate | None:
    if raw.get("gate") is None:
        return None
    sub = f"{path}.gate"
    gate = _required(raw, "gate", path, dict)
    dataset = _required(gate, "dataset", sub, dict)
    source = ModelSource(
        uri=_required(dataset, "uri", f"{sub}.dataset", str),
        sha256=_required(dataset, "sha256", f"{sub}.dataset", str),
    )
    _check_model(source, f"{sub}.dataset")
    file_format = _optional(dataset, "format", f"{sub}.dataset", str, "csv")
    if file_format not in GATE_FORMATS:
        raise InvalidSpecError(f"{sub}.dataset.format: {file_format!r} must be csv or jsonl")
    min_agreement = _optional(gate, "minAgreement", sub, float, 1.0)
    if not 0 <= min_agreement <= 1:
        raise InvalidSpecError(f"{sub}.minAgreement: {min_agreement} is outside 0..1")
    return Gate(
        dataset=source,
        format=file_format,
        against=_optional(gate, "against", sub, str, None),
        outputs=tuple(_optional(gate, "outputs", sub, list, ())),
        absolute_tolerance=_non_negative(gate, "absoluteTolerance", sub, float) or 0.0,
        relative_tolerance=_non_negative(gate, "relativeTolerance", sub, float) or 0.0,
        min_agreement=min_agreement,
    )


def _parse_rollout(spec: Mapping[str, Any]) -> Rollout | None:
    if spec.get("rollout") is None:
        return None
    path = "spec.rollout"
    raw = _required(spec, "rollout", "spec", dict)
    steps = tuple(
        RolloutStep(
            percent=_required(
                _as(step, f"{path}.steps[{i}]", dict), "percent", f"{path}.steps[{i}]", int
            ),
            hold_seconds=_required(step, "holdSeconds", f"{path}.steps[{i}]", int),
        )
        for i, step in enumerate(_optional(raw, "steps", path, list, ()))
    )
    percents = [step.percent for step in steps]
    if percents != sorted(set(percents)) or not all(0 < p < 100 for p in percents):
        raise InvalidSpecError(f"{path}.steps: percent must increase from step to step, in 1..99")
    if any(step.hold_seconds < 1 for step in steps):
        raise InvalidSpecError(f"{path}.steps: holdSeconds must be at least 1")
    analysis = _optional(raw, "analysis", path, dict, {})
    policy = _optional(raw, "lowTraffic", path, str, "hold")
    if policy not in LOW_TRAFFIC_POLICIES:
        raise InvalidSpecError(
            f"{path}.lowTraffic: {policy!r} must be one of {LOW_TRAFFIC_POLICIES}"
        )
    return Rollout(
        steps=steps,
        analysis=Analysis(
            error_rate=_parse_bound(analysis, "errorRate", f"{path}.analysis"),
            p99_latency_ms=_parse_bound(analysis, "p99LatencyMs", f"{path}.analysis"),
            shadow_disagreement=_parse_bound(analysis, "shadowDisagreement", f"{path}.analysis"),
            prometheus_url=_required(
                _optional(analysis, "prometheus", f"{path}.analysis", dict, {}),
                "url",
                f"{path}.analysis.prometheus",
                str,
            )
            if "prometheus" in analysis
            else None,
        ),
        min_samples=max(_optional(raw, "minSamples", path, int, 100), 1),
        failure_limit=max(_optional(raw, "failureLimit", path, int, 0), 0),
        low_traffic=policy,
        interval_seconds=max(_optional(raw, "intervalSeconds", path, int, 30), 1),
        deadline_seconds=_optional(raw, "deadlineSeconds", path, int, None),
        probes=_parse_probes(raw, path),
        shadow=_parse_shadow_step(raw, path),
    )


def _parse_shadow_step(raw: Mapping[str, Any], path: str) -> ShadowStep | None:
    if raw.get("shadow") is None:
        return None
    sub = f"{path}.shadow"
    shadow = _required(raw, "shadow", path, dict)
    percent = _optional(shadow, "percent", sub, int, 100)
    hold = _required(shadow, "holdSeconds", sub, int)
    if not 1 <= percent <= 100 or hold < 1:
        raise InvalidSpecError(f"{sub}: percent must be in 1..100 and holdSeconds at least 1")
    return ShadowStep(percent, hold, _non_negative(shadow, "tolerance", sub, float))


def _parse_probes(raw: Mapping[str, Any], path: str) -> Probes | None:
    if raw.get("probes") is None:
        return None
    probes = _required(raw, "probes", path, dict)
    rate = _required(probes, "requestsPerSecond", f"{path}.probes", int)
    if not MIN_PROBE_RATE <= rate <= MAX_PROBE_RATE:
        raise InvalidSpecError(
            f"{path}.probes.requestsPerSecond: {rate} is outside {MIN_PROBE_RATE}..{MAX_PROBE_RATE}"
        )
    return Probes(requests_per_second=rate)


def _parse_bound(analysis: Mapping[str, Any], key: str, path: str) -> Bound:
    raw = _optional(analysis, key, path, dict, {})
    return Bound(
        max=_non_negative(raw, "max", f"{path}.{key}", float),
        max_ratio_to_stable=_non_negative(raw, "maxRatioToStable", f"{path}.{key}", float),
    )


def _parse_autoscaling(raw: Mapping[str, Any], path: str) -> Autoscaling | None:
    if raw.get("autoscaling") is None:
        return None
    scaling = _required(raw, "autoscaling", path, dict)
    sub = f"{path}.autoscaling"
    result = Autoscaling(
        min_replicas=_optional(scaling, "minReplicas", sub, int, 1),
        max_replicas=_required(scaling, "maxReplicas", sub, int),
        target_cpu_utilization_percentage=_optional(
            scaling, "targetCPUUtilizationPercentage", sub, int, 80
        ),
    )
    if not 1 <= result.min_replicas <= result.max_replicas:
        raise InvalidSpecError(f"{sub}: need 1 <= minReplicas <= maxReplicas")
    return result


def _parse_server(raw: Mapping[str, Any], path: str) -> ServerSettings:
    return ServerSettings(
        max_batch_size=_non_negative(raw, "maxBatchSize", path, int),
        max_batch_delay_ms=_non_negative(raw, "maxBatchDelayMs", path, float),
        intra_op_threads=_non_negative(raw, "intraOpThreads", path, int),
        max_request_bytes=_non_negative(raw, "maxRequestBytes", path, int),
        max_rows=_non_negative(raw, "maxRows", path, int),
        request_timeout_seconds=_non_negative(raw, "requestTimeoutSeconds", path, float),
    )


def _non_negative(raw: Mapping[str, Any], key: str, path: str, kind: type[N]) -> N | None:
    value = _optional(raw, key, path, kind, None)
    if value is not None and value < 0:
        raise InvalidSpecError(f"{path}.{key}: {value} must not be negative")
    return value


def _parse_routing(raw: Mapping[str, Any]) -> Routing:
    mode = _optional(raw, "mode", "spec.routing", str, "router")
    if mode not in ROUTING_MODES:
        raise InvalidSpecError(f"spec.routing.mode: {mode!r} must be one of {ROUTING_MODES}")
    header = _optional(raw, "headerOverride", "spec.routing", str, DEFAULT_HEADER_OVERRIDE)
    if not _HEADER_NAME.match(header):
        raise InvalidSpecError(f"spec.routing.headerOverride: {header!r} is not a header name")
    sticky = _optional(raw, "stickyHeader", "spec.routing", str, None)
    if sticky is not None:
        if not _HEADER_NAME.match(sticky):
            raise InvalidSpecError(f"spec.routing.stickyHeader: {sticky!r} is not a header name")
        if sticky.lower() == header.lower():
            raise InvalidSpecError("spec.routing.stickyHeader: must differ from headerOverride")
        if mode != "router":
            raise InvalidSpecError("spec.routing.stickyHeader: only allowed when mode is router")
        sticky = sticky.lower()
    timeout = _optional(raw, "timeoutSeconds", "spec.routing", int, None)
    if timeout is not None and not (1 <= timeout <= 3600 and mode == "router"):
        raise InvalidSpecError(
            f"spec.routing.timeoutSeconds: {timeout} must be 1..3600, in router mode only"
        )
    gateway = None
    if mode == "gateway":
        raw_gateway = _optional(raw, "gateway", "spec.routing", dict, {})
        sub = "spec.routing.gateway"
        parent_refs = tuple(_optional(raw_gateway, "parentRefs", sub, list, ()))
        if not parent_refs:
            raise InvalidSpecError("spec.routing.gateway.parentRefs: gateway mode needs a Gateway")
        gateway = GatewaySettings(
            parent_refs=parent_refs,
            hostnames=tuple(_optional(raw_gateway, "hostnames", sub, list, ())),
            path_prefix=_optional(raw_gateway, "pathPrefix", sub, str, "/"),
        )
    return Routing(
        mode=mode,
        header_override=header.lower(),
        gateway=gateway,
        sticky_header=sticky,
        shadow=_parse_shadow(raw, mode),
        timeout_seconds=timeout,
    )


def _parse_shadow(routing: Mapping[str, Any], mode: str) -> Shadow | None:
    raw = _optional(routing, "shadow", "spec.routing", dict, None)
    if raw is None:
        return None
    path = "spec.routing.shadow"
    if mode == "none":
        raise InvalidSpecError(f"{path}: needs routing mode router or gateway")
    percent = _required(raw, "percent", path, int)
    if not 0 <= percent <= 100:
        raise InvalidSpecError(f"{path}.percent: {percent} is not in 0..100")
    tolerance = _optional(raw, "tolerance", path, float, None)
    if tolerance is not None and (tolerance < 0 or mode != "router"):
        raise InvalidSpecError(f"{path}.tolerance: a number >= 0, in router mode only")
    return Shadow(_required(raw, "variant", path, str), percent, tolerance)


def _parse_pod(raw: Mapping[str, Any]) -> PodSettings:
    path = "spec.pod"
    labels = _optional(raw, "labels", path, dict, None)
    reserved = sorted(set(labels or {}) & RESERVED_LABELS)
    if reserved:
        raise InvalidSpecError(f"{path}.labels: {reserved} are set by the operator itself")
    return PodSettings(
        image=_optional(raw, "image", path, str, None),
        image_pull_secrets=tuple(
            _required(_as(ref, f"{path}.imagePullSecrets[{i}]", dict), "name", path, str)
            for i, ref in enumerate(_optional(raw, "imagePullSecrets", path, list, ()))
        ),
        service_account_name=_optional(raw, "serviceAccountName", path, str, None),
        node_selector=_optional(raw, "nodeSelector", path, dict, None),
        tolerations=tuple(_optional(raw, "tolerations", path, list, ())),
        affinity=_optional(raw, "affinity", path, dict, None),
        labels=labels,
        annotations=_optional(raw, "annotations", path, dict, None),
    )


def _check_variants(variants: tuple[Variant, ...]) -> None:
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidSpecError(f"spec.variants: duplicate variant names {duplicates}")
    for index, variant in enumerate(variants):
        against = variant.gate.against if variant.gate else None
        if against is not None and (against == variant.name or against not in names):
            raise InvalidSpecError(
                f"spec.variants[{index}].gate.against: {against!r} must name another variant"
            )
    total = sum(v.weight for v in variants)
    if total != 100:
        raise InvalidSpecError(f"spec.variants[*].weight: weights sum to {total}, not 100")


def _required(obj: Mapping[str, Any], key: str, path: str, kind: type[T]) -> T:
    value = obj.get(key)
    if value is None:
        raise InvalidSpecError(f"{_join(path, key)}: required")
    return _as(value, _join(path, key), kind)


def _optional(obj: Mapping[str, Any], key: str, path: str, kind: type[T], default: D) -> T | D:
    value = obj.get(key)
    return default if value is None else _as(value, _join(path, key), kind)


def _as(value: Any, path: str, kind: type[T]) -> T:
    # bool is an int subclass in Python; a JSON `true` is never a valid count or weight.
    if isinstance(value, bool) and kind is not bool:
        raise InvalidSpecError(f"{path}: expected {kind.__name__}, got a boolean")
    if kind is float and isinstance(value, int):
        return cast(T, float(value))
    if not isinstance(value, kind):
        raise InvalidSpecError(f"{path}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class ModelDeploymentRef:
    """A variant of a ModelDeployment in the same namespace, whose model a BatchPrediction uses."""

    name: str
    variant: str


@dataclass(frozen=True)
class BatchPrediction:
    """A parsed BatchPrediction; its model is given (`model`) or referenced (`model_ref`)."""

    name: str
    namespace: str
    uid: str | None
    generation: int
    model: ModelSource | None
    model_ref: ModelDeploymentRef | None
    input_uri: str
    input_sha256: str | None
    file_format: str
    output_uri: str
    shards: int
    parallelism: int
    retries_per_shard: int
    batch_rows: int
    on_error: str
    resources: Mapping[str, Any] | None
    pod: PodSettings

    @property
    def output_claim_and_dir(self) -> tuple[str, str]:
        """`pvc://claim/dir/` -> ("claim", "dir"); the claim's root is ("claim", "")."""
        claim, _, path = self.output_uri.removeprefix("pvc://").partition("/")
        return claim, path.rstrip("/")


def parse_batch_prediction(obj: Mapping[str, Any]) -> BatchPrediction:
    """Parse a BatchPrediction (a plain dict, as the API server stores it, defaults filled in)."""
    obj = copy.deepcopy(dict(obj))
    metadata = _optional(obj, "metadata", "", dict, {})
    spec = _required(obj, "spec", "", dict)
    name = _required(metadata, "name", "metadata", str)
    raw_model = _required(spec, "model", "spec", dict)
    raw_ref = _optional(raw_model, "modelDeployment", "spec.model", dict, None)
    model = None
    model_ref = None
    if raw_ref is not None:
        path = "spec.model.modelDeployment"
        model_ref = ModelDeploymentRef(
            _required(raw_ref, "name", path, str), _required(raw_ref, "variant", path, str)
        )
    else:
        model = ModelSource(
            uri=_required(raw_model, "uri", "spec.model", str),
            sha256=_required(raw_model, "sha256", "spec.model", str),
        )
        _check_model(model, "spec.model")
    raw_input = _required(spec, "input", "spec", dict)
    shards = _optional(spec, "shards", "spec", int, 1)
    return BatchPrediction(
        name=name,
        namespace=_optional(metadata, "namespace", "metadata", str, DEFAULT_NAMESPACE),
        uid=_optional(metadata, "uid", "metadata", str, None),
        generation=_optional(metadata, "generation", "metadata", int, 1),
        model=model,
        model_ref=model_ref,
        input_uri=_required(raw_input, "uri", "spec.input", str),
        input_sha256=_optional(raw_input, "sha256", "spec.input", str, None),
        file_format=_optional(raw_input, "format", "spec.input", str, "csv"),
        output_uri=_required(_required(spec, "output", "spec", dict), "uri", "spec.output", str),
        shards=shards,
        parallelism=_optional(spec, "parallelism", "spec", int, shards),
        retries_per_shard=_optional(spec, "retriesPerShard", "spec", int, 2),
        batch_rows=_optional(spec, "batchRows", "spec", int, 8192),
        on_error=_optional(spec, "onError", "spec", str, "fail"),
        resources=_optional(spec, "resources", "spec", dict, None),
        pod=_parse_pod(_optional(spec, "pod", "spec", dict, {})),
    )
