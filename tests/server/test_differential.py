"""The server's predictions equal scikit-learn's on whole data sets, through every format."""

from __future__ import annotations

import csv
import io
from typing import Any

import httpx
import numpy as np
import pytest

from tests.models import MIXED_FLOAT_COLUMNS, MIXED_STRING_COLUMNS, BuiltModel
from tests.processes import RunningProcess

# onnxruntime computes in float32, scikit-learn in float64.
PROBABILITY_ATOL = 1e-5


def v2_outputs(server: RunningProcess, model: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=30
    )
    assert response.status_code == 200, response.text
    return {
        out["name"]: np.array(out["data"]).reshape(out["shape"])
        for out in response.json()["outputs"]
    }


def assert_matches(built: BuiltModel, labels: Any, probabilities: Any) -> None:
    np.testing.assert_array_equal(np.asarray(labels), built.estimator.predict(built.features))
    np.testing.assert_allclose(
        np.asarray(probabilities, dtype=np.float64),
        built.estimator.predict_proba(built.features),
        atol=PROBABILITY_ATOL,
    )


def records_predictions(server: RunningProcess, model: str, instances: list[Any]) -> list[Any]:
    response = httpx.post(
        f"{server.url}/v1/models/{model}:predict", json={"instances": instances}, timeout=30
    )
    assert response.status_code == 200, response.text
    predictions: list[Any] = response.json()["predictions"]
    return predictions


def csv_rows(
    server: RunningProcess, model: str, header: list[str], rows: list[list[Any]]
) -> list[dict[str, str]]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    response = httpx.post(
        f"{server.url}/v1/models/{model}:predict",
        content=buffer.getvalue().encode(),
        headers={"content-type": "text/csv", "accept": "text/csv"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


@pytest.mark.parametrize("fixture", ["iris", "mlp"])
def test_numeric_models_v2_json(fixture: str, request: pytest.FixtureRequest) -> None:
    built: BuiltModel = request.getfixturevalue(fixture)
    server: RunningProcess = request.getfixturevalue(f"{fixture}_server")
    name = {"iris": "iris", "mlp": "digits"}[fixture]
    features = np.asarray(built.features, dtype=np.float32)
    outputs = v2_outputs(
        server,
        name,
        [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(features.shape),
                "data": features.ravel().tolist(),
            }
        ],
    )
    assert_matches(built, outputs["label"], outputs["probabilities"])


def test_iris_records_and_csv(iris: BuiltModel, iris_server: RunningProcess) -> None:
    features = np.asarray(iris.features, dtype=np.float32)
    predictions = records_predictions(iris_server, "iris", features.tolist())
    assert_matches(
        iris, [p["label"] for p in predictions], [p["probabilities"] for p in predictions]
    )

    by_name = records_predictions(
        iris_server, "iris", [{"input": row} for row in features.tolist()]
    )
    assert by_name == predictions

    rows = csv_rows(
        iris_server, "iris", ["sepal_l", "sepal_w", "petal_l", "petal_w"], features.tolist()
    )
    assert_matches(
        iris,
        [int(row["label"]) for row in rows],
        [[float(row[f"probabilities_{k}"]) for k in range(3)] for row in rows],
    )


def test_mixed_pipeline_v2_json(mixed: BuiltModel, mixed_server: RunningProcess) -> None:
    frame = mixed.features
    inputs = [
        {
            "name": column,
            "datatype": "BYTES",
            "shape": [len(frame), 1],
            "data": frame[column].tolist(),
        }
        for column in MIXED_STRING_COLUMNS
    ] + [
        {
            "name": column,
            "datatype": "FP32",
            "shape": [len(frame), 1],
            "data": frame[column].tolist(),
        }
        for column in MIXED_FLOAT_COLUMNS
    ]
    outputs = v2_outputs(mixed_server, "mixed", inputs)
    assert_matches(mixed, outputs["label"], outputs["probabilities"])


def test_mixed_pipeline_records_as_objects_and_lists(
    mixed: BuiltModel, mixed_server: RunningProcess
) -> None:
    frame = mixed.features
    objects = records_predictions(mixed_server, "mixed", frame.to_dict(orient="records"))
    assert_matches(mixed, [p["label"] for p in objects], [p["probabilities"] for p in objects])
    # Positional lists follow the model's input order, which is the frame's column order here.
    lists = records_predictions(mixed_server, "mixed", frame.to_numpy().tolist())
    assert lists == objects


def test_mixed_pipeline_csv(mixed: BuiltModel, mixed_server: RunningProcess) -> None:
    frame = mixed.features
    # Columns are matched by name, so their order in the file does not matter.
    header = ["income", "plan", "age", "city"]
    rows = csv_rows(mixed_server, "mixed", header, frame[header].to_numpy().tolist())
    assert_matches(
        mixed,
        [int(row["label"]) for row in rows],
        [[float(row["probabilities_0"]), float(row["probabilities_1"])] for row in rows],
    )


def test_csv_answer_as_json_when_not_asked_for_csv(
    iris: BuiltModel, iris_server: RunningProcess
) -> None:
    response = httpx.post(
        f"{iris_server.url}/v1/models/iris:predict",
        content=b"a,b,c,d\n5.1,3.5,1.4,0.2\n",
        headers={"content-type": "text/csv; charset=utf-8"},
    )
    assert response.status_code == 200, response.text
    assert (
        response.json()["predictions"][0]["label"]
        == iris.estimator.predict([[5.1, 3.5, 1.4, 0.2]])[0]
    )
