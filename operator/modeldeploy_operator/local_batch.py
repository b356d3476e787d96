"""`modeldeploy batch -f FILE`: a BatchPrediction on this machine, its shards as processes.

The same YAML as on a cluster: each shard is `modeldeploy-server batch --shard I/N` (what the Job's
pods run), at most `parallelism` at a time; pvc:// and file:// locations map to directories as in
`modeldeploy run`. As on a cluster, the last shard to finish writes `manifest.json` into the output
directory, joining the shards' manifests (no times in it: the same run gives the same bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from modeldeploy_operator.batch_render import UnresolvedModel, resolve_model
from modeldeploy_operator.contract import BATCH_MANIFEST
from modeldeploy_operator.local import Download, LocalFile, local_path, locate_model
from modeldeploy_operator.spec import BatchPrediction, ModelDeployment

SERVER_COMMAND = (sys.executable, "-P", "-m", "modeldeploy_server.cli")
_POLL_S = 0.2


class LocalBatchError(Exception):
    """Why the local batch run failed, in words."""


@dataclass(frozen=True)
class LocalBatchSettings:
    """Where local mode finds what the YAML names."""

    base_dir: Path
    claim_dirs: Mapping[str, Path]
    cache_dir: Path


def shard_argv(
    bp: BatchPrediction, model: Path, sha256: str, input_: str, output: Path
) -> list[str]:
    """`modeldeploy-server batch` for every shard but --shard (and its termination message)."""
    argv = [
        *SERVER_COMMAND,
        "batch",
        "--model-path",
        str(model),
        "--sha256",
        sha256,
        "--input",
        input_,
        "--output",
        str(output),
        "--format",
        bp.file_format,
        "--batch-rows",
        str(bp.batch_rows),
        "--on-error",
        bp.on_error,
    ]
    if bp.input_sha256:
        argv += ["--input-sha256", bp.input_sha256]
    return argv


def run_local_batch(
    bp: BatchPrediction,
    models: Sequence[ModelDeployment],
    settings: LocalBatchSettings,
    out: TextIO,
) -> int:
    """Run every shard; 0 when all succeeded (and manifest.json is written), else 1."""
    try:
        _run(bp, models, settings, out)
        output = _output_dir(bp, settings)
        document = _report(output / BATCH_MANIFEST)
        if not document:
            raise LocalBatchError(
                f"every shard succeeded, but {output / BATCH_MANIFEST} is missing"
            )
    except LocalBatchError as error:
        print(f"modeldeploy batch: error: {error}", file=sys.stderr)
        return 1
    print(
        f"{bp.name}: {document['rowsOut']} rows predicted ({document['rowsSkipped']} skipped) in "
        f"{bp.shards} shard(s); {output / BATCH_MANIFEST}",
        file=out,
    )
    return 0


def _output_dir(bp: BatchPrediction, settings: LocalBatchSettings) -> Path:
    return local_path(bp.output_uri, base_dir=settings.base_dir, claim_dirs=settings.claim_dirs)


def _model_file(
    bp: BatchPrediction, models: Sequence[ModelDeployment], settings: LocalBatchSettings
) -> tuple[Path, str]:
    named = {md.name: md for md in models}
    try:
        source = resolve_model(bp, named.get(bp.model_ref.name) if bp.model_ref else None)
    except UnresolvedModel as error:
        raise LocalBatchError(f"spec.model.modelDeployment: {error} (in this file)") from None
    location = locate_model(
        source,
        base_dir=settings.base_dir,
        claim_dirs=settings.claim_dirs,
        cache_dir=settings.cache_dir,
    )
    if isinstance(location, LocalFile):
        return location.path, source.sha256
    assert isinstance(location, Download)
    if not location.cache_path.is_file():
        argv = [*SERVER_COMMAND, "fetch", location.url, str(location.cache_path)]
        fetched = subprocess.run(
            [*argv, "--sha256", source.sha256], capture_output=True, text=True, check=False
        )
        if fetched.returncode != 0:
            raise LocalBatchError(fetched.stderr.strip() or f"cannot fetch {location.url}")
    return location.cache_path, source.sha256


def _run(
    bp: BatchPrediction,
    models: Sequence[ModelDeployment],
    settings: LocalBatchSettings,
    out: TextIO,
) -> None:
    model, sha256 = _model_file(bp, models, settings)
    input_ = bp.input_uri
    if not input_.startswith(("http://", "https://")):
        input_ = str(local_path(input_, base_dir=settings.base_dir, claim_dirs=settings.claim_dirs))
    output = _output_dir(bp, settings)
    # A run id of its own (the uid when the YAML has one): part manifests of earlier runs in the
    # same directory never count towards this run's manifest.json.
    run = ["--run-id", bp.uid or f"local-{uuid.uuid4()}", "--run-name", bp.name]
    argv = [*shard_argv(bp, model, sha256, input_, output), *run]
    pending = list(range(bp.shards))
    running: dict[int, subprocess.Popen[bytes]] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modeldeploy-batch-") as scratch:
        messages = Path(scratch)
        try:
            while pending or running:
                while pending and len(running) < bp.parallelism and not failures:
                    index = pending.pop(0)
                    shard = ["--shard", f"{index}/{bp.shards}"]
                    message = ["--termination-message-path", str(messages / f"{index}.json")]
                    log = (messages / f"{index}.log").open("wb")
                    running[index] = subprocess.Popen(
                        [*argv, *shard, *message], stdout=log, stderr=subprocess.STDOUT
                    )
                    print(
                        f"  shard {index}/{bp.shards}: started (pid {running[index].pid})", file=out
                    )
                if failures:
                    pending.clear()
                for index, process in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[index]
                    report = _report(messages / f"{index}.json")
                    if process.returncode == 0 and "part" in report:
                        print(
                            f"  shard {index}/{bp.shards}: {report['rowsOut']} rows, "
                            f"{report['rowsPerSecond']:,.0f} rows/s, {report['part']['name']}",
                            file=out,
                        )
                    else:
                        log_tail = (messages / f"{index}.log").read_text(errors="replace")
                        reason = report.get("error") or log_tail.strip()[-500:]
                        failures.append(f"shard {index}/{bp.shards}: {reason}")
                time.sleep(_POLL_S)
        finally:
            for process in running.values():
                process.terminate()
                process.wait()
    if failures:
        raise LocalBatchError("; ".join(failures))


def _report(path: Path) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report
