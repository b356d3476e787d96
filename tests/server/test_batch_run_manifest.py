"""The run's manifest.json: written by whichever shard of the run finishes last, as processes on
the real filesystem, in any order or all at once; part manifests of another run never count."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import orjson
import pytest

from modeldeploy_server.batchio import Shard
from tests.models import BuiltModel
from tests.processes import server_command
from tests.server.test_batch import _table, write_input

SHARDS = 4


def shard_argv(built: BuiltModel, source: Path, output: Path, index: int, run: str) -> list[str]:
    return [
        *server_command(), "batch", "--model-path", str(built.path), "--input", str(source),
        "--output", str(output), "--shard", f"{index}/{SHARDS}", "--batch-rows", "16",
        "--run-id", run, "--run-name", "weekly",
    ]  # fmt: skip


def run_shard(built: BuiltModel, source: Path, output: Path, index: int, run: str) -> None:
    argv = shard_argv(built, source, output, index, run)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def source(iris: BuiltModel, tmp_path: Path) -> Path:
    header, rows = _table("iris", iris)
    path = tmp_path / "iris.csv"
    write_input(path, "csv", header, rows)
    return path


def expected_manifest(source: Path, output: Path) -> dict[str, object]:
    parts = [output / f"{Shard(i, SHARDS).name}.csv" for i in range(SHARDS)]
    manifests = [orjson.loads(p.with_suffix(".manifest.json").read_bytes()) for p in parts]
    return {
        "batchPrediction": "weekly",
        "format": "csv",
        "shards": SHARDS,
        "model": manifests[0]["model"],
        "input": {
            "uri": str(source),
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "bytes": source.stat().st_size,
        },
        "rowsIn": 150,
        "rowsOut": 150,
        "rowsSkipped": 0,
        "parts": [
            {
                "name": part.name,
                "bytes": part.stat().st_size,
                "sha256": hashlib.sha256(part.read_bytes()).hexdigest(),
                "rows": manifest["rowsOut"],
                "skipped": None,
            }
            for part, manifest in zip(parts, manifests, strict=True)
        ],
    }


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]])
def test_the_last_shard_to_finish_writes_the_run_manifest_in_any_order(
    iris: BuiltModel, source: Path, tmp_path: Path, order: list[int]
) -> None:
    output = tmp_path / "out"
    for done, index in enumerate(order, start=1):
        run_shard(iris, source, output, index, "uid-1")
        assert (output / "manifest.json").exists() == (done == SHARDS)
    document = orjson.loads((output / "manifest.json").read_bytes())
    assert document == expected_manifest(source, output)
    assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]


def test_shards_finishing_together_write_one_identical_manifest(
    iris: BuiltModel, source: Path, tmp_path: Path
) -> None:
    sequential = tmp_path / "one-by-one"
    for index in range(SHARDS):
        run_shard(iris, source, sequential, index, "uid-1")
    together = tmp_path / "together"
    processes = [
        subprocess.Popen(
            shard_argv(iris, source, together, index, "uid-2"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for index in range(SHARDS)
    ]
    try:
        assert [process.wait(timeout=120) for process in processes] == [0] * SHARDS
    finally:
        for process in processes:
            process.kill()  # a no-op for those that ended
            process.wait()
    # The same run's manifest whichever shard wrote it, and the run id is not in it.
    assert (together / "manifest.json").read_bytes() == (sequential / "manifest.json").read_bytes()
    assert not [p.name for p in together.iterdir() if p.name.endswith(".tmp")]


def test_part_manifests_of_another_run_never_count(
    iris: BuiltModel, source: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    for index in range(SHARDS):
        run_shard(iris, source, output, index, "old-run")
    assert (output / "manifest.json").exists()
    # A new run: its first shard removes the old run's manifest.json, and the old run's part
    # manifests of shards 1-3 do not complete the new run.
    run_shard(iris, source, output, 0, "new-run")
    assert not (output / "manifest.json").exists()
    for index in (1, 2):
        run_shard(iris, source, output, index, "new-run")
        assert not (output / "manifest.json").exists()
    run_shard(iris, source, output, 3, "new-run")
    runs = {
        orjson.loads((output / f"{Shard(i, SHARDS).name}.manifest.json").read_bytes())["run"]
        for i in range(SHARDS)
    }
    assert runs == {"new-run"}
    assert orjson.loads((output / "manifest.json").read_bytes()) == expected_manifest(
        source, output
    )


def test_without_a_run_id_no_run_manifest_and_no_run_in_part_manifests(
    iris: BuiltModel, source: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    for index in range(SHARDS):
        argv = shard_argv(iris, source, output, index, "x")[:-4]
        assert subprocess.run(argv, capture_output=True, timeout=120, check=False).returncode == 0
    assert not (output / "manifest.json").exists()
    manifest = orjson.loads((output / f"{Shard(0, SHARDS).name}.manifest.json").read_bytes())
    assert "run" not in manifest
