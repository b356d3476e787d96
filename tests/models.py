"""ONNX models built with scikit-learn + skl2onnx for tests and benchmarks (never downloaded).

Each builder writes `<name>.onnx` into a directory and returns a `BuiltModel` with what differential
tests need: the fitted estimator and the data it was fitted on. Building takes about a second each,
so test suites cache them in session fixtures.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_digits, load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier

# skl2onnx emits ai.onnx opset up to this; onnxruntime in the server must support it.
TARGET_OPSET = 17


@dataclass(frozen=True)
class BuiltModel:
    """An ONNX file plus the fitted estimator and data it reproduces."""

    path: Path
    sha256: str
    estimator: Any
    features: Any  # numpy array, or a pandas DataFrame for the mixed-type pipeline
    target: np.ndarray[Any, Any]


def _export(
    estimator: Any, initial_types: list[tuple[str, Any]], directory: Path, name: str
) -> tuple[Path, str]:
    """Convert a fitted estimator (probabilities as a tensor, no zipmap) and write `<name>.onnx`."""
    onnx_model = to_onnx(
        estimator,
        initial_types=initial_types,
        options={id(estimator): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    path = directory / f"{name}.onnx"
    data = onnx_model.SerializeToString()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _build_iris(directory: Path, batch: int | None, name: str) -> BuiltModel:
    features, target = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    estimator = LogisticRegression(max_iter=500).fit(features, target)
    path, sha = _export(estimator, [("input", FloatTensorType([batch, 4]))], directory, name)
    return BuiltModel(path, sha, estimator, features, target)


def build_iris_logreg(directory: Path) -> BuiltModel:
    """Logistic regression on iris: input `input` [-1, 4] FP32; outputs `label`, `probabilities`."""
    return _build_iris(directory, None, "iris_logreg")


def build_iris_fixed_batch(directory: Path, batch: int = 1) -> BuiltModel:
    """The iris logistic regression exported with a fixed batch dimension ([batch, 4])."""
    return _build_iris(directory, batch, f"iris_fixed_batch{batch}")


def build_iris_stump(directory: Path) -> BuiltModel:
    """A depth-1 decision tree on iris (same input and outputs as the logistic regression, other
    answers: it never predicts one of the three classes)."""
    features, target = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    estimator = DecisionTreeClassifier(max_depth=1, random_state=0).fit(features, target)
    path, sha = _export(estimator, [("input", FloatTensorType([None, 4]))], directory, "iris_stump")
    return BuiltModel(path, sha, estimator, features, target)


def build_digits_mlp(directory: Path) -> BuiltModel:
    """The "medium" model: an MLP (64-256-256-10) on the digits data set, input `input` [-1, 64]."""
    features, target = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    estimator = MLPClassifier(hidden_layer_sizes=(256, 256), max_iter=30, random_state=0)
    with warnings.catch_warnings():
        # A few epochs fit digits well enough; full convergence would only slow the tests.
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(features, target)
    path, sha = _export(
        estimator, [("input", FloatTensorType([None, 64]))], directory, "digits_mlp"
    )
    return BuiltModel(path, sha, estimator, features, target)


MIXED_STRING_COLUMNS = ("city", "plan")
MIXED_FLOAT_COLUMNS = ("age", "income")


def mixed_frame(rows: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray[Any, Any]]:
    """A deterministic tabular data set with string and float columns and a learnable label."""
    rng = np.random.default_rng(seed)
    city = rng.choice(["paris", "lyon", "nantes", "lille", "brest"], size=rows)
    plan = rng.choice(["free", "pro", "team"], size=rows)
    age = rng.uniform(18, 80, size=rows).round(1)
    income = rng.lognormal(10, 0.5, size=rows).round(2)
    score = (plan == "pro") * 1.5 + (city == "paris") * 0.8 + (age - 45) / 20 + np.log(income) - 10
    target = (score + rng.normal(0, 0.5, size=rows) > 0.5).astype(np.int64)
    frame = pd.DataFrame({"city": city, "plan": plan, "age": age, "income": income})
    return frame, target


def build_mixed_pipeline(directory: Path) -> BuiltModel:
    """ColumnTransformer(OneHotEncoder + StandardScaler) + classifier, one ONNX input per column."""
    frame, target = mixed_frame(600)
    estimator = Pipeline(
        [
            (
                "prep",
                ColumnTransformer(
                    [
                        ("cat", OneHotEncoder(handle_unknown="ignore"), list(MIXED_STRING_COLUMNS)),
                        ("num", StandardScaler(), list(MIXED_FLOAT_COLUMNS)),
                    ]
                ),
            ),
            ("clf", LogisticRegression(max_iter=500)),
        ]
    ).fit(frame, target)
    initial_types: list[tuple[str, Any]] = [
        *((name, StringTensorType([None, 1])) for name in MIXED_STRING_COLUMNS),
        *((name, FloatTensorType([None, 1])) for name in MIXED_FLOAT_COLUMNS),
    ]
    path, sha = _export(estimator, initial_types, directory, "mixed_pipeline")
    return BuiltModel(path, sha, estimator, frame, target)


Dim = int | str | None  # fixed size, symbolic name, or unnamed dynamic


def write_graph(
    directory: Path,
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: dict[str, tuple[int, list[Dim]]],
    outputs: dict[str, tuple[int, list[Dim]]],
) -> Path:
    """A hand-written ONNX graph (opset 17) as `<name>.onnx`; tensors are {name: (onnx elem type,
    shape)}."""
    graph = onnx.helper.make_graph(
        nodes,
        name,
        [onnx.helper.make_tensor_value_info(n, t, shape) for n, (t, shape) in inputs.items()],
        [onnx.helper.make_tensor_value_info(n, t, shape) for n, (t, shape) in outputs.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = directory / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path
