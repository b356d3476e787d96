"""Shared fixtures: models built once per session, and running servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.models import (
    BuiltModel,
    build_digits_mlp,
    build_iris_fixed_batch,
    build_iris_logreg,
    build_mixed_pipeline,
)
from tests.processes import RunningProcess, serve_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def iris(model_dir: Path) -> BuiltModel:
    return build_iris_logreg(model_dir)


@pytest.fixture(scope="session")
def mixed(model_dir: Path) -> BuiltModel:
    return build_mixed_pipeline(model_dir)


@pytest.fixture(scope="session")
def mlp(model_dir: Path) -> BuiltModel:
    return build_digits_mlp(model_dir)


@pytest.fixture(scope="session")
def fixed_batch(model_dir: Path) -> BuiltModel:
    return build_iris_fixed_batch(model_dir)


@pytest.fixture(scope="session")
def iris_server(iris: BuiltModel) -> Iterator[RunningProcess]:
    extra = ["--sha256", iris.sha256, "--max-rows", "1000"]
    with serve_model(iris.path, "iris", extra_args=extra) as server:
        yield server


@pytest.fixture(scope="session")
def mixed_server(mixed: BuiltModel) -> Iterator[RunningProcess]:
    with serve_model(mixed.path, "mixed", "v2") as server:
        yield server


@pytest.fixture(scope="session")
def mlp_server(mlp: BuiltModel) -> Iterator[RunningProcess]:
    with serve_model(mlp.path, "digits") as server:
        yield server
