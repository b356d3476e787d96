"""Thousands of generated, mostly malformed requests: never a 5xx, always a JSON error.

Two generators: schemathesis from the server's own OpenAPI document (every route, valid and
invalid bodies, paths and headers), and hypothesis strategies aimed at the v2 inference body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from modeldeploy_server.metadata import ModelMetadata, TensorSpec
from modeldeploy_server.openapi import build_openapi
from tests.models import MIXED_FLOAT_COLUMNS, MIXED_STRING_COLUMNS, BuiltModel
from tests.processes import RunningProcess, serve_model

SCHEMATHESIS_EXAMPLES = 150  # per operation; 13 operations
HYPOTHESIS_EXAMPLES = 1000


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def mixed_fuzz_server(mixed: BuiltModel) -> Iterator[RunningProcess]:
    # Small limits so that generated bodies also hit the byte and row limits.
    limits = ["--max-request-bytes", "20000", "--max-rows", "50"]
    with serve_model(mixed.path, "mixed", extra_args=limits) as server:
        yield server


# The document the server serves at /v2/openapi.json, built from the mixed model's signature
# (the test below checks that it is the same one).
MIXED_METADATA = ModelMetadata(
    name="mixed",
    version="1",
    sha256="0" * 64,
    inputs=tuple(
        [TensorSpec(name, "BYTES", (-1, 1)) for name in MIXED_STRING_COLUMNS]
        + [TensorSpec(name, "FP32", (-1, 1)) for name in MIXED_FLOAT_COLUMNS]
    ),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))),
    batch_axis=True,
)
schema = schemathesis.openapi.from_dict(build_openapi(MIXED_METADATA))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=SCHEMATHESIS_EXAMPLES,
    deterministic=True,
)


def test_the_fuzzed_document_is_the_served_one(mixed_fuzz_server: RunningProcess) -> None:
    served = httpx.get(f"{mixed_fuzz_server.url}/v2/openapi.json").json()
    assert served == build_openapi(MIXED_METADATA)


@schema.parametrize()
def test_schemathesis_finds_no_server_error(
    case: schemathesis.Case[Any], mixed_fuzz_server: RunningProcess
) -> None:
    response = case.call(base_url=mixed_fuzz_server.url)
    assert response.status_code < 500, (case.as_curl_command(), response.text)
    if response.status_code >= 400:
        assert set(orjson.loads(response.content)) == {"error"}


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=8,
)
names = st.sampled_from(["city", "plan", "age", "income", "", "other"]) | st.text()
datatypes = st.sampled_from(["BYTES", "FP32", "FP64", "INT64", "BOOL", "FP16", "UINT8", "BF16", ""])
dims = st.integers(min_value=-2, max_value=60)
shapes = st.lists(dims, max_size=4) | json_values
flat_data = (
    st.lists(st.floats(width=32, allow_nan=False), max_size=60)
    | st.lists(st.text(max_size=5), max_size=60)
    | st.lists(st.integers(), max_size=60)
    | json_values
)
tensors = st.fixed_dictionaries(
    {"name": names, "datatype": datatypes, "shape": shapes},
    optional={"data": flat_data, "parameters": json_values | st.fixed_dictionaries(
        {"binary_data_size": st.integers(min_value=-5, max_value=100)})},
)  # fmt: skip
documents = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=5) | json_values},
    optional={
        "id": json_values,
        "parameters": json_values,
        "outputs": st.lists(st.fixed_dictionaries({"name": names}), max_size=3) | json_values,
    },
)


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    document=documents,
    tail=st.binary(max_size=64),
    header_length=st.none() | st.integers(min_value=-1, max_value=400).map(str),
)
def test_generated_v2_bodies_never_give_a_server_error(
    mixed_fuzz_server: RunningProcess,
    document: dict[str, Any],
    tail: bytes,
    header_length: str | None,
) -> None:
    body = json.dumps(document).encode() + tail
    headers = {} if header_length is None else {"inference-header-content-length": header_length}
    response = httpx.post(
        f"{mixed_fuzz_server.url}/v2/models/mixed/infer", content=body, headers=headers
    )
    assert response.status_code in (200, 400, 413), response.text
    if response.status_code != 200:
        assert set(response.json()) == {"error"}


@settings(
    max_examples=HYPOTHESIS_EXAMPLES // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    body=st.binary(max_size=300)
    | st.builds(lambda v: json.dumps({"instances": v}).encode(), json_values)
    | st.text(max_size=200).map(str.encode),
    content_type=st.sampled_from(["application/json", "text/csv", "text/csv; charset=utf-8", ""]),
)
def test_generated_records_and_csv_bodies_never_give_a_server_error(
    mixed_fuzz_server: RunningProcess, client: httpx.Client, body: bytes, content_type: str
) -> None:
    response = client.post(
        f"{mixed_fuzz_server.url}/v1/models/mixed:predict",
        content=body,
        headers={"content-type": content_type},
    )
    assert response.status_code in (200, 400, 413), response.text
