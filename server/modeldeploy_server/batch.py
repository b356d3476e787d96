"""`modeldeploy-server batch`: score a CSV, JSON-lines or .npz file with one model, one shard at a
time.

    modeldeploy-server batch --model-path M.onnx --sha256 HEX --input data.csv --output out/ \
        [--format csv|jsonl|npz] [--shard I/N] [--batch-rows N] [--on-error fail|skip] \
        [--run-id UID --run-name NAME]

Streams the input (http(s)://, file:// or a path), verifying the model's sha256 before anything
else and the input's (`--input-sha256`) as it goes. Writes into the output directory, for shard I
of N: `part-0000I-of-0000N.<format>` (the predictions of the shard's rows, in input order),
`part-...skipped.jsonl` (with `--on-error skip`, when rows were skipped) and, last,
`part-...manifest.json`: a part is complete when its manifest exists. With `--run-id`, the last
shard of the run to finish also writes the run's `manifest.json`. On failure nothing of the
shard is left but the reason, on stderr and in `--termination-message-path`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import orjson

from modeldeploy_operator.contract import BATCH_MANIFEST, BATCH_RUN_ID_ENV, BATCH_RUN_NAME_ENV
from modeldeploy_server.batching import probe_batching
from modeldeploy_server.batchio import (
    FORMATS,
    ONE_SHARD,
    BatchError,
    DecodedChunk,
    FileDigest,
    InputReadError,
    PartEncoder,
    Shard,
    ShardChunker,
    ShardResult,
    SkippedRow,
    combined_manifest,
    decode_chunk,
    manifest_bytes,
    parse_csv_header,
    parse_shard,
    progress_line,
    shard_bounds,
    skipped_lines,
    stack_rows,
)
from modeldeploy_server.config import (
    parse_positive_float,
    parse_positive_int,
    parse_sha256,
    resolve_options,
)
from modeldeploy_server.digest import CHUNK_BYTES
from modeldeploy_server.errors import ConfigError, ModelRejected, ServerError
from modeldeploy_server.fetch import FetchError, declared_length, open_source
from modeldeploy_server.npzio import NpzInput, NpzPartWriter, decode_npz_chunk, seekable_input
from modeldeploy_server.runtime import OnnxModel, load_model
from modeldeploy_server.termination import write_termination_message

# Exit codes: 1 bad input, model or output (a retry fails the same way), 2 bad configuration,
# 3 the input could not be read to its end (worth retrying).
EXIT_RETRYABLE = 3
_PROGRESS_EVERY_S = 0.5
_BLOCK_BYTES = 1 << 20  # lines are read about this many bytes at a time


@dataclass(frozen=True)
class BatchConfig:
    """Everything one `modeldeploy-server batch` run needs, validated."""

    model_path: Path
    input: str
    output: Path
    format: str = "csv"
    shard: Shard = ONE_SHARD
    batch_rows: int = 8192
    on_error: str = "fail"
    sha256: str | None = None
    input_sha256: str | None = None
    intra_op_threads: int = 1
    timeout_s: float = 60.0
    termination_message_path: Path | None = None
    run_id: str | None = None
    run_name: str | None = None


def _choice(*allowed: str) -> Any:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


# field -> (env var, parser, help)
_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "model_path": ("MODELDEPLOY_MODEL_PATH", Path, "ONNX model file (required)"),
    "sha256": ("MODELDEPLOY_MODEL_SHA256", parse_sha256, "expected sha256 of the model file"),
    "input": ("MODELDEPLOY_BATCH_INPUT", str, "input: http(s)://, file:// or a path (required)"),
    "input_sha256": ("MODELDEPLOY_BATCH_INPUT_SHA256", parse_sha256, "expected input sha256"),
    "output": ("MODELDEPLOY_BATCH_OUTPUT", Path, "output directory (required)"),
    "format": ("MODELDEPLOY_BATCH_FORMAT", _choice(*FORMATS), "csv, jsonl or npz; default csv"),
    "shard": ("MODELDEPLOY_BATCH_SHARD", parse_shard, "this shard, I/N (0-based); default 0/1"),
    "batch_rows": (
        "MODELDEPLOY_BATCH_ROWS",
        parse_positive_int,
        "rows per model run; default 8192",
    ),
    "on_error": ("MODELDEPLOY_BATCH_ON_ERROR", _choice("fail", "skip"), "bad rows: fail or skip"),
    "intra_op_threads": (
        "MODELDEPLOY_INTRA_OP_THREADS",
        parse_positive_int,
        "onnxruntime intra-op threads; default 1",
    ),
    "timeout_s": ("MODELDEPLOY_BATCH_TIMEOUT_S", parse_positive_float, "network timeout (s)"),
    "run_id": (
        BATCH_RUN_ID_ENV,
        str,
        "the run's id (a BatchPrediction's uid): the last shard of the run to finish writes "
        f"{BATCH_MANIFEST}",
    ),
    "run_name": (BATCH_RUN_NAME_ENV, str, f"the run's name, for {BATCH_MANIFEST}"),
    "termination_message_path": (
        "MODELDEPLOY_TERMINATION_MESSAGE_PATH",
        Path,
        "write the outcome here as JSON (a Kubernetes termination message)",
    ),
}


def parse_batch_config(argv: Sequence[str], env: Mapping[str, str]) -> BatchConfig:
    """Flags win over MODELDEPLOY_* variables, which win over defaults; raises ConfigError."""
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server batch",
        description="Score a CSV or JSON-lines file with one ONNX model (one shard of it).",
    )
    for name, (env_var, _, help_) in _OPTIONS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=f"{help_} [env {env_var}]"
        )
    args = vars(parser.parse_args(list(argv)))
    options = {name: (env_var, parse) for name, (env_var, parse, _) in _OPTIONS.items()}
    values = resolve_options(args, env, options, required=("model_path", "input", "output"))
    return BatchConfig(**values)


class _HashingReader(io.RawIOBase):
    """Counts and hashes what the buffered reader above it pulls from the source."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.digest = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count: int = self._source.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self.digest.update(memoryview(buffer)[:count])
            self.bytes += count
        return count


class _HashingWriter:
    """A file written through a sha256."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise BatchError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._digest.update(data)
        self.bytes += len(data)

    def commit(self, final: Path) -> FileDigest:
        """Flush to disk and rename into place."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.path, final)
        return FileDigest(final.name, self.bytes, self._digest.hexdigest())

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _input_size(source: BinaryIO) -> int | None:
    if getattr(source, "headers", None) is not None:
        return declared_length(source)
    try:
        return os.fstat(source.fileno()).st_size
    except (OSError, io.UnsupportedOperation):
        return None


def _score(model: OnnxModel, decoded: DecodedChunk) -> tuple[dict[str, Any], list[SkippedRow]]:
    """Run the chunk; when the model rejects it, row by row to find the rows it rejects."""
    if not decoded.lines:
        return {}, []
    try:
        return model.run(decoded.feed), []
    except ModelRejected as exc:
        if len(decoded.lines) == 1:
            return {}, [SkippedRow(decoded.lines[0], str(exc))]
    outputs: list[dict[str, np.ndarray[Any, Any]]] = []
    skipped: list[SkippedRow] = []
    for row, number in enumerate(decoded.lines):
        try:
            outputs.append(model.run({k: v[row : row + 1] for k, v in decoded.feed.items()}))
        except ModelRejected as exc:
            skipped.append(SkippedRow(number, str(exc)))
    return stack_rows(outputs), skipped


def _rows_share_runs(model: OnnxModel) -> bool:
    """Whether rows may run together: the server's batching probe (on a synthetic request, as
    the server without a warm-up example), so batch and server agree. Else each row runs alone,
    as the server runs each request as sent."""
    if not model.metadata.batch_axis:
        return False
    merges, why = probe_batching(model.run, model.synthetic_feed())
    if not merges:
        print(f"modeldeploy-server batch: batching off: {why}", file=sys.stderr)
    return merges


class _Progress:
    """Rows, rows/s and ETA on a terminal, at most every half second."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self.started = time.monotonic()
        self._shown = 0.0

    def show(self, rows: int, fraction: float | None, final: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or (not final and now - self._shown < _PROGRESS_EVERY_S):
            return
        self._shown = now
        line = progress_line(rows, now - self.started, fraction)
        print(f"\r{line}\x1b[K", end="\n" if final else "", file=sys.stderr, flush=True)


def run_batch(config: BatchConfig, progress: bool) -> ShardResult:
    """Score the shard; raises BatchError (after removing what it wrote) when it cannot."""
    shard = config.shard
    output = config.output
    part_path = output / f"{shard.name}.{config.format}"
    skipped_path = output / f"{shard.name}.skipped.jsonl"
    manifest_path = output / shard.manifest_name
    try:
        output.mkdir(parents=True, exist_ok=True)
        # What an earlier run left would present this run's output as complete.
        # The run's manifest too: this shard is not done, so it cannot be this run's.
        for stale in (manifest_path, part_path, skipped_path, output / BATCH_MANIFEST):
            stale.unlink(missing_ok=True)
        part = _HashingWriter(output / f".{part_path.name}.tmp")
        side = _HashingWriter(output / f".{skipped_path.name}.tmp")
    except OSError as exc:
        raise BatchError(f"cannot write to the output directory {output}: {exc}") from None
    try:
        return _run(config, part, side, (part_path, skipped_path, manifest_path), progress)
    except BaseException:
        part.discard()
        side.discard()
        raise


@dataclass
class _Scored:
    """What the shard read and wrote."""

    rows_in: int = 0
    rows_out: int = 0
    data_rows: bool = False  # whether the input has any row (in any shard)


def _score_chunks(
    config: BatchConfig,
    model: OnnxModel,
    chunks: Iterable[tuple[int, DecodedChunk]],
    sink: Callable[[Mapping[str, np.ndarray[Any, Any]]], None],
    side: _HashingWriter,
    show: Callable[[int], None],
    unit: str,
) -> tuple[int, int]:
    """Score (rows read, decoded rows) chunks into `sink`; bad rows per `--on-error`."""
    rows_in = rows_out = 0
    for count, decoded in chunks:
        outputs, rejected = _score(model, decoded)
        skipped = sorted([*decoded.skipped, *rejected], key=lambda row: row.line)
        if skipped and config.on_error == "fail":
            first_bad = skipped[0]
            raise BatchError(
                f"{unit} {first_bad.line}: {first_bad.reason} (--on-error skip skips bad rows)"
            )
        rows_in += count
        if outputs:
            sink(outputs)
        rows_out += len(decoded.lines) - len(rejected)
        side.write(skipped_lines(skipped, unit))
        show(rows_in)
    return rows_in, rows_out


def _score_text(
    config: BatchConfig,
    model: OnnxModel,
    reader: IO[bytes],
    bounds_of: Callable[[int], tuple[int, int]],
    part: _HashingWriter,
    side: _HashingWriter,
    show: Callable[[int], None],
) -> _Scored:
    metadata = model.metadata
    header: list[str] = []
    data_start = 0
    if config.format == "csv":
        first = reader.readline()
        if not first:
            raise BatchError(f"{config.input} is empty: CSV needs a header row")
        header = parse_csv_header(first, metadata)
        data_start = len(first)
    rows_per_run = config.batch_rows if _rows_share_runs(model) else 1
    start, end = bounds_of(data_start)
    # Other shards' lines are only counted (and hashed), never split into lines.
    before, offset, data_before = _count_lines(reader, data_start, start)
    chunker = ShardChunker((start, end), rows_per_run, (2 if header else 1) + before, offset)
    chunks = (
        (len(chunk.lines), decode_chunk(chunk, config.format, header, metadata))
        for chunk in chunker.chunks(_line_blocks(reader, offset, end))
    )
    encoder = PartEncoder(config.format)
    sink = lambda outputs: part.write(encoder.encode(outputs))  # noqa: E731
    scored = _score_chunks(config, model, chunks, sink, side, show, "line")
    _, _, data_after = _count_lines(reader, 0, 1 << 62)
    return _Scored(*scored, data_rows=data_before or chunker.data_lines or data_after)


def _count_lines(reader: IO[bytes], offset: int, start: int) -> tuple[int, int, bool]:
    """Read from `offset` up to the first line that starts at or after `start` (or to the end),
    in blocks: (lines read, the offset reached, whether any of them was not blank)."""
    lines = 0
    data = False
    while offset < start:
        # Up to the byte before `start`, then to the end of its line: a line that starts at
        # `start` follows a newline at start - 1.
        wanted = start - 1 - offset
        block = reader.read(min(wanted, _BLOCK_BYTES)) if wanted else reader.readline()
        if not block:
            break
        lines += block.count(b"\n")
        data = data or bool(block.strip())
        offset += len(block)
        if not wanted:
            break
    return lines, offset, data


def _line_blocks(reader: IO[bytes], offset: int, end: int) -> Iterator[list[bytes]]:
    """Blocks of whole lines (about _BLOCK_BYTES each) until one reaches `end`."""
    while offset < end:
        block = reader.readlines(_BLOCK_BYTES)
        if not block:
            return
        offset += sum(map(len, block))
        yield block


def _score_npz(
    config: BatchConfig,
    model: OnnxModel,
    source: BinaryIO,
    reader: IO[bytes],
    part: _HashingWriter,
    side: _HashingWriter,
    show: Callable[[int, float | None], None],
) -> _Scored:
    metadata = model.metadata
    writer = NpzPartWriter(config.output, [spec.name for spec in metadata.outputs])
    with contextlib.ExitStack() as stack:
        stack.callback(writer.discard)
        file = seekable_input(source, reader)
        if file is not source:
            stack.enter_context(file)
        npz = NpzInput(file, config.input, metadata)
        start, stop = shard_bounds(0, npz.rows, config.shard)
        rows_per_run = config.batch_rows if _rows_share_runs(model) else 1
        chunks = (
            (len(arrays[metadata.inputs[0].name]), decode_npz_chunk(first, arrays, metadata))
            for first, arrays in npz.read(start, stop, rows_per_run)
        )
        total = max(stop - start, 1)
        scored = _score_chunks(
            config, model, chunks, writer.write, side, lambda rows: show(rows, rows / total), "row"
        )
        if not writer.rows:
            # An empty part still names every output, with its dtype and row shape.
            template = model.run(model.synthetic_feed())
            writer.write({name: array[:0] for name, array in template.items()})
        writer.finish(part.write)
    return _Scored(*scored, data_rows=npz.rows > 0)


def _run(
    config: BatchConfig,
    part: _HashingWriter,
    side: _HashingWriter,
    paths: tuple[Path, Path, Path],
    progress: bool,
) -> ShardResult:
    try:
        model = load_model(config.model_path, "batch", "1", config.sha256, config.intra_op_threads)
    except ConfigError as exc:
        raise BatchError(str(exc)) from None
    metadata = model.metadata
    try:
        source = open_source(config.input, config.timeout_s)
    except FetchError as exc:
        raise BatchError(str(exc)) from None
    shard = config.shard
    with source:
        size = _input_size(source)
        if size is None and shard.count > 1 and config.format != "npz":
            raise BatchError(
                f"the size of {config.input} is unknown (no Content-Length): sharding needs it"
            )
        hashing = _HashingReader(source)
        reader = io.BufferedReader(hashing, CHUNK_BYTES)
        meter = _Progress(progress)
        try:
            if config.format == "npz":
                scored = _score_npz(config, model, source, reader, part, side, meter.show)
            else:
                scored = _score_text(
                    config,
                    model,
                    reader,
                    lambda start: shard_bounds(start, size if size is not None else 1 << 62, shard),
                    part,
                    side,
                    lambda rows: meter.show(rows, hashing.bytes / size if size else None),
                )
        except ServerError as exc:
            raise BatchError(str(exc)) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc or type(exc).__name__
            raise InputReadError(f"cannot read {config.input}: {reason}") from None
        meter.show(scored.rows_in, 1.0, final=True)
    if size is not None and hashing.bytes != size:
        raise InputReadError(f"{config.input} is truncated: read {hashing.bytes} of {size} bytes")
    input_sha256 = hashing.digest.hexdigest()
    if config.input_sha256 is not None and input_sha256 != config.input_sha256:
        raise BatchError(
            f"{config.input} has sha256 {input_sha256}, expected {config.input_sha256}"
        )
    if not scored.data_rows:
        raise BatchError(f"{config.input} has no data rows")
    part_path, skipped_path, manifest_path = paths
    part_digest = part.commit(part_path)
    skipped_digest = side.commit(skipped_path) if side.bytes else None
    if skipped_digest is None:
        side.discard()
        skipped_path.unlink(missing_ok=True)
    result = ShardResult(
        shard=shard,
        file_format=config.format,
        model_sha256=metadata.sha256,
        input_uri=config.input,
        input_sha256=input_sha256,
        input_bytes=hashing.bytes,
        rows_in=scored.rows_in,
        rows_out=scored.rows_out,
        part=part_digest,
        skipped=skipped_digest,
        run_id=config.run_id,
    )
    manifest = _HashingWriter(manifest_path.with_name(f".{manifest_path.name}.tmp"))
    manifest.write(manifest_bytes(result.manifest()))
    manifest.commit(manifest_path)
    if config.run_id is not None:
        _write_run_manifest(config)
    return result


def _write_run_manifest(config: BatchConfig) -> None:
    """Write the run's manifest.json when every shard of this run has written its manifest.

    Each shard looks after writing its own (a rename), so the last to finish sees all of them;
    shards finishing together each write the same bytes (each through its own temporary name,
    then a rename), so the race is harmless. A manifest of another run (another uid) does not
    count."""
    count = config.shard.count
    manifests = []
    for index in range(count):
        path = config.output / Shard(index, count).manifest_name
        try:
            document = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return
        if not isinstance(document, dict) or document.get("run") != config.run_id:
            return
        manifests.append(document)
    combined = combined_manifest(config.run_name or config.run_id or "", manifests)
    final = config.output / BATCH_MANIFEST
    writer = _HashingWriter(final.with_name(f".{BATCH_MANIFEST}.{config.shard.index}.tmp"))
    try:
        writer.write(manifest_bytes(combined))
        writer.commit(final)
    except OSError as exc:
        raise BatchError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        writer.discard()  # its temporary file, if the rename did not happen


def _write_message(path: Path | None, document: Mapping[str, Any]) -> None:
    shorter = {"error": str(document.get("error", "result too long"))[:1024]}
    write_termination_message(path, document, shorter, "modeldeploy-server batch")


def main(argv: list[str]) -> int:
    """Entry point of `modeldeploy-server batch`."""
    try:
        config = parse_batch_config(argv, os.environ)
    except ConfigError as exc:
        print(f"modeldeploy-server batch: error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        result = run_batch(config, progress=sys.stderr.isatty())
    except BatchError as exc:
        print(f"modeldeploy-server batch: error: {exc}", file=sys.stderr)
        _write_message(config.termination_message_path, {"error": str(exc)[:1024]})
        return EXIT_RETRYABLE if isinstance(exc, InputReadError) else 1
    except KeyboardInterrupt:
        print("modeldeploy-server batch: interrupted; nothing written", file=sys.stderr)
        return 130
    seconds = time.monotonic() - started
    rate = result.rows_in / seconds if seconds > 0 else 0.0
    _write_message(
        config.termination_message_path,
        {**result.manifest(), "seconds": round(seconds, 3), "rowsPerSecond": round(rate, 1)},
    )
    print(
        f"shard {result.shard.index}/{result.shard.count}: {result.rows_in} rows in, "
        f"{result.rows_out} out, {result.rows_in - result.rows_out} skipped, {rate:,.0f} rows/s; "
        f"{config.output / result.part.name} sha256 {result.part.sha256}",
        file=sys.stderr,
    )
    return 0
