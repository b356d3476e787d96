"""Batch predictions, the pure part: shards, input lines, chunk decoding, the manifest.

Every physical line of the input is one record (a CSV header line, then data lines; or one JSON
instance per line), so a shard is the lines that start in its byte range and line numbers are
exact. Rows decode with the records endpoint's own functions, so a row scored in batch is the row
the server would score. No onnxruntime, no clock, no environment.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from modeldeploy_server.errors import MalformedRequest, ServerError
from modeldeploy_server.metadata import ModelMetadata, validate_inputs
from modeldeploy_server.records import (
    check_csv_fields,
    check_csv_header,
    check_csv_text,
    encode_csv,
    encode_prediction_lines,
    tensors_from_csv,
    tensors_from_instances,
)

FORMATS = ("csv", "jsonl")
_SHARD = re.compile(r"^(\d+)/(\d+)$")


class BatchError(Exception):
    """Why a batch run stopped, in words (with the input line number where there is one)."""


class InputReadError(BatchError):
    """The input stopped arriving (network, volume): unlike bad content, worth retrying."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    @property
    def name(self) -> str:
        """The shard's part of file names: part-00001-of-00004."""
        return f"part-{self.index:05d}-of-{self.count:05d}"


ONE_SHARD = Shard(0, 1)


def parse_shard(value: str) -> Shard:
    """`I/N` with 0 <= I < N."""
    match = _SHARD.match(value.strip())
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError("must be I/N with 0 <= I < N, for example 0/4")
    return Shard(int(match[1]), int(match[2]))


def shard_bounds(data_start: int, size: int, shard: Shard) -> tuple[int, int]:
    """The byte range [start, end) of the data whose lines belong to the shard."""
    span = max(size - data_start, 0)
    return (
        data_start + span * shard.index // shard.count,
        data_start + span * (shard.index + 1) // shard.count,
    )


@dataclass(frozen=True)
class SkippedRow:
    """A row left out under `--on-error skip`: its line number and why."""

    line: int
    reason: str


@dataclass
class Chunk:
    """Consecutive data lines of one shard: (line number, raw line) each."""

    lines: list[tuple[int, bytes]]


def chunk_lines(
    lines: Iterable[tuple[int, int, bytes]], data_start: int, bounds: tuple[int, int], rows: int
) -> Iterator[Chunk]:
    """Group the shard's non-blank data lines (number, offset, bytes) into chunks of `rows`.

    Reads `lines` to the end, so that the caller sees (and hashes) the whole input."""
    start, end = bounds
    pending: list[tuple[int, bytes]] = []
    for number, offset, line in lines:
        if offset < data_start or not start <= offset < end or not line.strip():
            continue
        pending.append((number, line))
        if len(pending) == rows:
            yield Chunk(pending)
            pending = []
    if pending:
        yield Chunk(pending)


def parse_csv_header(line: bytes, metadata: ModelMetadata) -> list[str]:
    """The header line's column names, checked against the model's inputs."""
    try:
        header = next(csv.reader([line.decode("utf-8-sig")], strict=True), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BatchError(f"line 1: the CSV header is not UTF-8 CSV: {exc}") from None
    if not header:
        raise BatchError("line 1: the CSV header row is empty")
    try:
        check_csv_header(header, metadata)
    except ServerError as exc:
        raise BatchError(f"line 1: {exc}") from None
    return header


@dataclass
class DecodedChunk:
    """The rows of a chunk that decoded, as a model feed with their line numbers, and the rows
    that did not."""

    feed: dict[str, np.ndarray[Any, Any]]
    lines: list[int]
    skipped: list[SkippedRow]


def parse_csv_line(line: bytes) -> list[str]:
    """The fields of one CSV line (a row never spans lines here); raises MalformedRequest."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("not UTF-8") from None
    check_csv_text(text, "the line")
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise MalformedRequest(
            f"malformed CSV: {exc} (in batch input every line is one row: quoted fields may not "
            "span lines)"
        ) from None


def parse_json_line(line: bytes) -> Any:
    """The instance on one JSON line (a list or an object); raises MalformedRequest."""
    try:
        instance = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(instance, list | dict):
        raise MalformedRequest("a JSON line must be an instance: a list of values or an object")
    return instance


def _csv_rows(lines: Sequence[tuple[int, bytes]], header: Sequence[str]) -> list[list[str]]:
    """All rows of the lines, or MalformedRequest when any line is not a row of the header."""
    try:
        texts = [line.decode("utf-8") for _, line in lines]
    except UnicodeDecodeError:
        raise MalformedRequest("not UTF-8") from None
    check_csv_text("".join(texts), "the chunk")
    reader = csv.reader(texts, strict=True)
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise MalformedRequest(str(exc)) from None
    if reader.line_num != len(lines) or len(rows) != len(lines):
        raise MalformedRequest("a quoted field spans lines")
    for (number, _), row in zip(lines, rows, strict=True):
        check_csv_fields(number, row, header)
    return rows


def decode_chunk(
    chunk: Chunk, file_format: str, header: Sequence[str], metadata: ModelMetadata
) -> DecodedChunk:
    """Decode and validate a chunk in one piece; when that fails, row by row to find the bad
    rows (the good ones are then stacked into one feed)."""
    lines = chunk.lines
    try:
        if file_format == "csv":
            tensors = tensors_from_csv(header, _csv_rows(lines, header), metadata)
        else:
            instances = [orjson.loads(line) for _, line in lines]
            tensors = tensors_from_instances(instances, metadata, _may_hold_bool(lines))
        feed, _ = validate_inputs(tensors, metadata, len(lines))
        return DecodedChunk(feed, [number for number, _ in lines], [])
    except (ServerError, orjson.JSONDecodeError):
        pass
    feeds: list[dict[str, np.ndarray[Any, Any]]] = []
    numbers: list[int] = []
    skipped: list[SkippedRow] = []
    for number, line in lines:
        try:
            feeds.append(decode_row(line, file_format, header, metadata, number))
            numbers.append(number)
        except ServerError as exc:
            skipped.append(SkippedRow(number, str(exc)))
    return DecodedChunk(stack_rows(feeds), numbers, skipped)


def decode_row(
    line: bytes, file_format: str, header: Sequence[str], metadata: ModelMetadata, number: int
) -> dict[str, np.ndarray[Any, Any]]:
    """One line's feed, exactly as the server decodes and validates a request of that row."""
    if file_format == "csv":
        row = parse_csv_line(line)
        check_csv_fields(number, row, header)
        tensors = tensors_from_csv(header, [row], metadata)
    else:
        instance = parse_json_line(line)
        tensors = tensors_from_instances([instance], metadata, _may_hold_bool([(number, line)]))
    feed, _ = validate_inputs(tensors, metadata, 1)
    return feed


def _may_hold_bool(lines: Sequence[tuple[int, bytes]]) -> bool:
    return any(b"true" in line or b"false" in line for _, line in lines)


def stack_rows(
    feeds: Sequence[Mapping[str, np.ndarray[Any, Any]]],
) -> dict[str, np.ndarray[Any, Any]]:
    """Feeds (or outputs) of some rows each, stacked along the batch dimension."""
    if not feeds:
        return {}
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


def number_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset, line) for each line."""
    offset = 0
    for number, line in enumerate(lines, start=1):
        yield number, offset, line
        offset += len(line)


class PartEncoder:
    """Predictions to the bytes of an output part: the records endpoint's encoders, so a row's
    line is the line the server answers for it."""

    def __init__(self, file_format: str) -> None:
        self._csv = file_format == "csv"
        self.header: bytes | None = None

    def encode(self, outputs: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
        """The part's bytes for these rows (the CSV header before the first rows)."""
        if not self._csv:
            return encode_prediction_lines(outputs)
        document = encode_csv(outputs)
        # Output names hold no newline, so the header is the first line.
        header, _, rows = document.partition(b"\n")
        if self.header is None:
            self.header = header
            return document
        if header != self.header:
            raise BatchError(
                f"the model's outputs changed shape between rows: CSV header {header.decode()!r}, "
                f"before {self.header.decode()!r}"
            )
        return rows


def skipped_lines(skipped: Iterable[SkippedRow]) -> bytes:
    """The side file: one JSON object per skipped row, `{"line": N, "error": "..."}`."""
    return b"".join(
        orjson.dumps({"line": row.line, "error": row.reason}, option=orjson.OPT_APPEND_NEWLINE)
        for row in skipped
    )


@dataclass(frozen=True)
class FileDigest:
    """An output file: its name in the output directory, size and sha256."""

    name: str
    bytes: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        """The manifest form."""
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardResult:
    """What one shard did, the content of its manifest."""

    shard: Shard
    file_format: str
    model_sha256: str
    input_uri: str
    input_sha256: str
    input_bytes: int
    rows_in: int
    rows_out: int
    part: FileDigest
    skipped: FileDigest | None

    def manifest(self) -> dict[str, Any]:
        """The shard's manifest: deterministic (no times), so reruns give identical bytes."""
        return {
            "shard": {"index": self.shard.index, "count": self.shard.count},
            "format": self.file_format,
            "model": {"sha256": self.model_sha256},
            "input": {
                "uri": self.input_uri,
                "sha256": self.input_sha256,
                "bytes": self.input_bytes,
            },
            "rowsIn": self.rows_in,
            "rowsOut": self.rows_out,
            "rowsSkipped": self.rows_in - self.rows_out,
            "part": self.part.as_json(),
            "skipped": None if self.skipped is None else self.skipped.as_json(),
        }


def manifest_bytes(document: Mapping[str, Any]) -> bytes:
    """A manifest as indented JSON with sorted keys."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def progress_line(rows: int, seconds: float, fraction: float | None) -> str:
    """`rows 1,234,567  412,345 rows/s  ETA 0:00:12` for a terminal."""
    rate = rows / seconds if seconds > 0 else 0.0
    text = f"rows {rows:,}  {rate:,.0f} rows/s"
    if fraction is not None and 0 < fraction < 1:
        left = int(seconds * (1 - fraction) / fraction)
        text += f"  ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return text
