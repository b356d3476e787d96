"""Fixtures shared by the router's tests: the iris model and two real servers of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.models import BuiltModel, build_iris_logreg
from tests.processes import RunningProcess, serve_model
from tests.router.test_router import MODEL, SERVE_ARGS


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_iris_logreg(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def backends(iris: BuiltModel) -> Iterator[dict[str, RunningProcess]]:
    """Two real servers, variants v1 and v2, of the same model."""
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(serve_model(iris.path, MODEL, name, SERVE_ARGS))
            for name in ("v1", "v2")
        }
