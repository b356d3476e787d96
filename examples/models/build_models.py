"""Build the two iris classifiers the examples deploy: examples/models/iris-v1.onnx and -v2.onnx.

Both take one float column per feature (so records can name columns and CSV headers match) and
answer `label` (int64) and `probabilities` (float32, one column per class). v2 standardises the
features first and regularises less: the variants agree on most rows and differ on a few near
class borders. Run with the project's virtualenv: `.venv/bin/python examples/models/build_models.py`
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
# Pinned so that rebuilding with the same library versions gives byte-identical files.
TARGET_OPSET = 17
MODELS_DIR = Path(__file__).resolve().parent


def build_model(version: str) -> bytes:
    """Train the iris classifier for `version` ("v1" or "v2") and return it as ONNX bytes."""
    frame = load_iris(as_frame=True).frame
    features = frame.iloc[:, :4].astype("float32")
    features.columns = list(FEATURES)
    columns = "passthrough" if version == "v1" else StandardScaler()
    regularisation = 1.0 if version == "v1" else 10.0
    pipeline = Pipeline(
        [
            ("columns", ColumnTransformer([("features", columns, list(FEATURES))])),
            ("classifier", LogisticRegression(C=regularisation, max_iter=1000)),
        ]
    )
    pipeline.fit(features, frame["target"])
    onnx_model = to_onnx(
        pipeline,
        initial_types=[(name, FloatTensorType([None, 1])) for name in FEATURES],
        options={"zipmap": False},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx collects opset imports in a set, whose order changes between runs (hash seeds).
    opsets = sorted(onnx_model.opset_import, key=lambda opset: opset.domain)
    del onnx_model.opset_import[:]
    onnx_model.opset_import.extend(opsets)
    serialized: bytes = onnx_model.SerializeToString()
    return serialized


def main() -> None:
    """Write both models beside this script and print their sha256 for examples/iris.yaml."""
    for version in ("v1", "v2"):
        data = build_model(version)
        path = MODELS_DIR / f"iris-{version}.onnx"
        path.write_bytes(data)
        print(f"{path.name}  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
