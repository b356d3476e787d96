"""Batch predictions, the pure part: shards, input lines, chunk decoding, the manifest.

Every physical line of the input is one record (a CSV header line, then data lines; or one JSON
instance per line), so a shard is the lines that start in its byte range and line numbers are
exact. Rows decode with the records endpoint's own functions, so a row scored in batch is the row
the server would score. No onnxruntime, no clock, no environment.
"""

from __future__ import annotations

import bisect
import csv
import itertools
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
    tensors_from_numeric_csv,
)

FORMATS = ("csv", "jsonl", "npz")
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

    @property
    def manifest_name(self) -> str:
        """The file name of the shard's manifest (written last: the part is complete)."""
        return f"{self.name}.manifest.json"


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
    """Consecutive non-blank data lines of one shard, with their line numbers."""

    numbers: Sequence[int]
    lines: list[bytes]

    def numbered(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line) for each line."""
        return zip(self.numbers, self.lines, strict=True)


class ShardChunker:
    """Cuts blocks of whole lines (as `readlines` gives them, from the first data line on) into
    chunks of the shard's non-blank lines, `rows` at a time; the shard's lines are those that start
    in its byte range. Whole blocks at a time: per line, only C loops run."""

    def __init__(
        self, bounds: tuple[int, int], rows: int, first_number: int, first_offset: int
    ) -> None:
        self._bounds = (max(bounds[0], first_offset), bounds[1])
        self._rows = rows
        self._number = first_number
        self._offset = first_offset
        self.data_lines = False  # whether the input has a non-blank data line (in any shard)

    def chunks(self, blocks: Iterable[list[bytes]]) -> Iterator[Chunk]:
        """The shard's chunks; reads `blocks` to the end (the caller gives the blocks up to the
        one that reaches the shard's end, and counts the lines before and after it)."""
        start, end = self._bounds
        numbers: list[int] = []
        lines: list[bytes] = []
        for block in blocks:
            self.data_lines = self.data_lines or any(map(bytes.strip, block))
            starts = list(itertools.accumulate(map(len, block), initial=self._offset))
            first = bisect.bisect_left(starts, start, 0, len(block))
            last = bisect.bisect_left(starts, end, first, len(block))
            mine = block[first:last]
            if all(map(bytes.strip, mine)):
                numbers.extend(range(self._number + first, self._number + last))
                lines.extend(mine)
            else:
                base = self._number + first
                kept = [(base + i, line) for i, line in enumerate(mine) if line.strip()]
                numbers.extend(number for number, _ in kept)
                lines.extend(line for _, line in kept)
            self._number += len(block)
            self._offset = starts[-1]
            while len(lines) >= self._rows:
                yield Chunk(numbers[: self._rows], lines[: self._rows])
                del numbers[: self._rows], lines[: self._rows]
        if lines:
            yield Chunk(numbers, lines)


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
    lines: Sequence[int]
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


def _csv_rows(chunk: Chunk, header: Sequence[str]) -> list[list[str]]:
    """All rows of the lines, or MalformedRequest when any line is not a row of the header."""
    lines = chunk.lines
    try:
        texts = [line.decode("utf-8") for line in lines]
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
    for number, row in zip(chunk.numbers, rows, strict=True):
        check_csv_fields(number, row, header)
    return rows


def decode_chunk(
    chunk: Chunk, file_format: str, header: Sequence[str], metadata: ModelMetadata
) -> DecodedChunk:
    """Decode and validate a chunk in one piece (lines of plain numbers as one block); when that
    fails, row by row to find the bad rows (the good ones are then stacked into one feed)."""
    lines = chunk.lines
    try:
        if file_format == "csv":
            tensors = tensors_from_numeric_csv(
                header, b"".join(lines), len(lines), metadata
            ) or tensors_from_csv(header, _csv_rows(chunk, header), metadata)
        else:
            instances = [orjson.loads(line) for line in lines]
            tensors = tensors_from_instances(instances, metadata, _may_hold_bool(lines))
        feed, _ = validate_inputs(tensors, metadata, len(lines))
        return DecodedChunk(feed, list(chunk.numbers), [])
    except (ServerError, orjson.JSONDecodeError):
        pass
    feeds: list[dict[str, np.ndarray[Any, Any]]] = []
    numbers: list[int] = []
    skipped: list[SkippedRow] = []
    for number, line in chunk.numbered():
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
        tensors = tensors_from_instances([instance], metadata, _may_hold_bool([line]))
    feed, _ = validate_inputs(tensors, metadata, 1)
    return feed


def _may_hold_bool(lines: Sequence[bytes]) -> bool:
    return any(b"true" in line or b"false" in line for line in lines)


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


def skipped_lines(skipped: Iterable[SkippedRow], unit: str = "line") -> bytes:
    """The side file: one JSON object per skipped row, `{"line": N, "error": "..."}` (an .npz
    input's rows: `{"row": N, ...}`, numbered from 0)."""
    return b"".join(
        orjson.dumps({unit: row.line, "error": row.reason}, option=orjson.OPT_APPEND_NEWLINE)
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
    run_id: str | None = None

    def manifest(self) -> dict[str, Any]:
        """The shard's manifest: deterministic (no times), so reruns give identical bytes (but
        for the run's id, when it has one)."""
        return {
            **({"run": self.run_id} if self.run_id is not None else {}),
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


def combined_manifest(name: str, manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's manifest, from its shards' (in shard order): the parts in order, the totals, the
    digests. No run id and no times: the same run gives the same bytes, on a cluster or here."""
    first = manifests[0]
    return {
        "batchPrediction": name,
        "format": first["format"],
        "shards": len(manifests),
        "model": first["model"],
        "input": first["input"],
        "rowsIn": sum(m["rowsIn"] for m in manifests),
        "rowsOut": sum(m["rowsOut"] for m in manifests),
        "rowsSkipped": sum(m["rowsSkipped"] for m in manifests),
        "parts": [{**m["part"], "rows": m["rowsOut"], "skipped": m["skipped"]} for m in manifests],
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
