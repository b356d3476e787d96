"""`modeldeploy batch -f`: a BatchPrediction on this machine, its shards as processes. Its parts
and its manifest.json are byte for byte those of `modeldeploy-server batch` run shard by shard
with the same run (what the Job's pods run), for CSV and .npz."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml

from tests.models import BuiltModel, build_iris_logreg
from tests.processes import server_command

SHARDS = 3


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_iris_logreg(tmp_path_factory.mktemp("models"))


def write_input(path: Path, built: BuiltModel, file_format: str) -> None:
    features = np.asarray(built.features, dtype=np.float32)
    if file_format == "npz":
        np.savez_compressed(path, input=features)
    else:
        lines = ["a,b,c,d", *(",".join(map(str, row)) for row in features)]
        path.write_text("\n".join(lines) + "\n")


def batch_prediction(built: BuiltModel, source: Path, file_format: str) -> dict[str, Any]:
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "BatchPrediction",
        "metadata": {"name": "iris-local", "uid": "uid-local-1"},
        "spec": {
            "model": {"uri": built.path.as_uri(), "sha256": built.sha256},
            "input": {"uri": source.as_uri(), "format": file_format},
            "output": {"uri": "pvc://data/out/"},
            "shards": SHARDS,
            "parallelism": 2,
            "batchRows": 32,
        },
    }


def modeldeploy_batch(manifest: Path, data: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("modeldeploy")), "batch", "-f", str(manifest)]
    return subprocess.run(
        [*command, "--pvc", f"data={data}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("file_format", ["csv", "npz"])
def test_local_batch_equals_the_shards_run_one_by_one(
    iris: BuiltModel, tmp_path: Path, file_format: str
) -> None:
    source = tmp_path / f"input.{file_format}"
    write_input(source, iris, file_format)
    manifest = tmp_path / "bp.yaml"
    manifest.write_text(yaml.safe_dump(batch_prediction(iris, source, file_format)))
    data = tmp_path / "data"
    result = modeldeploy_batch(manifest, data)
    assert result.returncode == 0, result.stderr
    assert f"iris-local: 150 rows predicted (0 skipped) in {SHARDS} shard(s)" in result.stdout

    by_hand = tmp_path / "by-hand"
    for index in range(SHARDS):
        subprocess.run(
            [
                *server_command(), "batch", "--model-path", str(iris.path),
                "--input", str(source), "--output", str(by_hand), "--format", file_format,
                "--shard", f"{index}/{SHARDS}", "--batch-rows", "32",
                "--run-id", "uid-local-1", "--run-name", "iris-local",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
    out = data / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in by_hand.iterdir())
    for path in by_hand.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    document = orjson.loads((out / "manifest.json").read_bytes())
    assert (document["rowsOut"], document["format"]) == (150, file_format)
    assert [part["name"] for part in document["parts"]] == [
        f"part-{i:05d}-of-{SHARDS:05d}.{file_format}" for i in range(SHARDS)
    ]


def test_a_failed_shard_fails_the_run_and_no_run_manifest_is_written(
    iris: BuiltModel, tmp_path: Path
) -> None:
    source = tmp_path / "input.csv"
    write_input(source, iris, "csv")
    with source.open("a") as stream:
        stream.write("1,2,oops,4\n")
    manifest = tmp_path / "bp.yaml"
    manifest.write_text(yaml.safe_dump(batch_prediction(iris, source, "csv")))
    result = modeldeploy_batch(manifest, tmp_path / "data")
    assert result.returncode == 1
    assert "line 152: " in result.stderr and "'oops' is not a JSON number" in result.stderr
    assert not (tmp_path / "data" / "out" / "manifest.json").exists()
