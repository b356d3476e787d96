"""Batch input and output as .npz: numpy's zip of .npy arrays, one member per tensor, rows along
the first axis. Binary and columnar, so nothing is parsed: a shard seeks to its first row in each
member and reads whole chunks of rows as arrays.

Never pickle: a member holding Python objects (dtype object) is refused from its header, before
any of its data is read; strings are numpy str arrays (dtype `<U`). Values are cast to the model's
datatypes by the server's own rule (`codec.cast_array`). Output parts are deterministic zips
(stored members with a fixed date, in the model's output order), so the same input, model and
shard count give the same bytes.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

from modeldeploy_server.batchio import (
    BatchError,
    DecodedChunk,
    InputReadError,
    SkippedRow,
    stack_rows,
)
from modeldeploy_server.codec import accepts_kind, cast_array
from modeldeploy_server.errors import ServerError
from modeldeploy_server.metadata import DecodedTensor, ModelMetadata, TensorSpec, validate_inputs

SUFFIX = ".npy"
# A fixed timestamp (the earliest a zip can hold) makes parts byte-identical across runs.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_COPY_BYTES = 1 << 20
# A zip's local file header: signature ... file name length, extra field length (APPNOTE 4.3.7).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


@dataclass(frozen=True)
class _Member:
    """One input's .npy member: where its rows start and what one row is."""

    spec: TensorSpec
    info: zipfile.ZipInfo
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...]
    rows: int
    data_offset: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize


def _read_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    raise ValueError(f".npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")


class NpzInput:
    """The model's inputs in an .npz: one member `<input name>.npy` each, the same row count."""

    def __init__(self, file: BinaryIO, where: str, metadata: ModelMetadata) -> None:
        self._where = where
        self._file = file
        try:
            self._zip = zipfile.ZipFile(file)
        except _READ_ERRORS as exc:
            raise BatchError(f"{where} is not an .npz file (a zip of .npy arrays): {exc}") from None
        found = {info.filename: info for info in self._zip.infolist() if not info.is_dir()}
        wanted = [spec.name + SUFFIX for spec in metadata.inputs]
        missing = [name for name in wanted if name not in found]
        unexpected = sorted(set(found) - set(wanted))
        if missing or unexpected:
            raise BatchError(
                f"{where}: the .npz must hold one member per model input, {wanted}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        self.members = [self._member(spec, found[spec.name + SUFFIX]) for spec in metadata.inputs]
        counts = {member.info.filename: member.rows for member in self.members}
        if len(set(counts.values())) > 1:
            raise BatchError(f"{where}: the members disagree on the number of rows: {counts}")
        self.rows = self.members[0].rows if self.members else 0

    def _member(self, spec: TensorSpec, info: zipfile.ZipInfo) -> _Member:
        where = f"{self._where}: member {info.filename!r}"
        if info.flag_bits & 0x1:
            raise BatchError(f"{where} is encrypted")
        try:
            with self._zip.open(info) as handle:
                shape, fortran_order, dtype = _read_header(handle)
                offset = handle.tell()
        except _READ_ERRORS as exc:
            raise BatchError(f"{where} is not a readable .npy array: {exc}") from None
        if dtype.hasobject:
            raise BatchError(
                f"{where} holds Python objects (dtype object), which only pickle could read: "
                "refused (save strings as a numpy str array, dtype '<U')"
            )
        if not shape:
            raise BatchError(f"{where} is a scalar; it needs one row per item along its first axis")
        if fortran_order and len(shape) > 1:
            raise BatchError(
                f"{where} is stored in Fortran order; save it C-contiguous "
                "(numpy.ascontiguousarray) so that rows can be read in order"
            )
        strings = spec.datatype == "BYTES"
        wanted = "a numpy str array (dtype '<U')" if strings else spec.datatype
        if not (dtype.kind == "U" if strings else accepts_kind(spec.datatype, dtype)):
            raise BatchError(f"{where} has dtype {dtype.str}, input {spec.name!r} needs {wanted}")
        row_shape = tuple(shape[1:])
        expected = spec.shape[1:]
        if len(row_shape) != len(expected) or any(
            want not in (-1, got) for got, want in zip(row_shape, expected, strict=True)
        ):
            raise BatchError(
                f"{where} has shape {list(shape)}, input {spec.name!r} expects "
                f"{list(spec.shape)} (-1: any size; the first axis holds the rows)"
            )
        member = _Member(spec, info, dtype, row_shape, shape[0], offset)
        if info.file_size != offset + member.rows * member.row_bytes:
            raise BatchError(
                f"{where} holds {info.file_size - offset} bytes of data, its header's shape "
                f"{list(shape)} needs {member.rows * member.row_bytes}"
            )
        return member

    def read(self, start: int, stop: int, rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(first row, the inputs' arrays) for rows [start, stop), `rows` at a time."""
        handles: list[IO[bytes] | _StoredMember] = []
        try:
            for member in self.members:
                handle = self._open(member.info)
                handles.append(handle)
                handle.seek(member.data_offset + start * member.row_bytes)
            for first in range(start, stop, rows):
                count = min(rows, stop - first)
                arrays: dict[str, Any] = {}
                for member, handle in zip(self.members, handles, strict=True):
                    data = handle.read(count * member.row_bytes)
                    if len(data) != count * member.row_bytes:
                        raise EOFError(f"member {member.info.filename!r} ends early")
                    array = np.frombuffer(data, dtype=member.dtype)
                    arrays[member.spec.name] = array.reshape((count, *member.row_shape))
                yield first, arrays
        except _READ_ERRORS as exc:
            raise InputReadError(f"cannot read {self._where}: {exc}") from None
        finally:
            for handle in handles:
                handle.close()

    def _open(self, info: zipfile.ZipInfo) -> IO[bytes] | _StoredMember:
        """A member to read: a stored one straight from the archive's file (seeking is free, and
        no CRC is computed, which a shard reading only its rows could not check anyway: the
        input's sha256 covers the file); a compressed one through zipfile, which inflates from
        the member's start."""
        if info.compress_type != zipfile.ZIP_STORED:
            return self._zip.open(info)
        self._file.seek(info.header_offset)
        local = _LOCAL_HEADER.unpack(self._file.read(_LOCAL_HEADER.size))
        if local[0] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"member {info.filename!r} has no local file header")
        name_bytes, extra_bytes = local[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_bytes + extra_bytes
        return _StoredMember(self._file, start)


class _StoredMember:
    """An uncompressed member's bytes, read from the archive's file at their offset."""

    def __init__(self, file: BinaryIO, start: int) -> None:
        self._file = file
        self._start = start
        self._position = start

    def seek(self, offset: int) -> None:
        """Go to `offset` bytes into the member."""
        self._position = self._start + offset

    def read(self, size: int) -> bytes:
        """Up to `size` bytes from the position on."""
        self._file.seek(self._position)
        data = self._file.read(size)
        self._position += len(data)
        return data

    def close(self) -> None:
        """The archive's file stays open for the other members."""


def _feed(
    arrays: Mapping[str, np.ndarray[Any, Any]], metadata: ModelMetadata, rows: int
) -> dict[str, np.ndarray[Any, Any]]:
    tensors = []
    for spec in metadata.inputs:
        array = arrays[spec.name]
        where = f"input {spec.name!r}"
        if spec.datatype == "BYTES":
            cast: np.ndarray[Any, Any] = array.astype(object)
        else:
            cast = cast_array(where, spec.datatype, array)
        tensors.append(DecodedTensor(spec.name, spec.datatype, cast))
    feed, _ = validate_inputs(tensors, metadata, rows)
    return feed


def decode_npz_chunk(
    first: int, arrays: Mapping[str, np.ndarray[Any, Any]], metadata: ModelMetadata
) -> DecodedChunk:
    """Cast and validate a chunk of rows in one piece; when that fails, row by row to find the
    bad rows (numbered from 0, as numpy indexes them)."""
    count = len(next(iter(arrays.values())))
    try:
        return DecodedChunk(_feed(arrays, metadata, count), range(first, first + count), [])
    except ServerError:
        pass
    feeds: list[dict[str, np.ndarray[Any, Any]]] = []
    numbers: list[int] = []
    skipped: list[SkippedRow] = []
    for row in range(count):
        try:
            feeds.append(_feed({k: v[row : row + 1] for k, v in arrays.items()}, metadata, 1))
            numbers.append(first + row)
        except ServerError as exc:
            skipped.append(SkippedRow(first + row, str(exc)))
    return DecodedChunk(stack_rows(feeds), numbers, skipped)


def seekable_input(source: BinaryIO, reader: IO[bytes]) -> BinaryIO:
    """The input as a seekable file, after `reader` (which hashes it) has read all of it: a
    regular file is read through once and rewound; anything else (a download) is copied to a
    temporary file as it arrives."""
    try:
        regular = stat.S_ISREG(os.fstat(source.fileno()).st_mode)
    except (OSError, io.UnsupportedOperation, AttributeError):
        regular = False
    if regular:
        while reader.read(_COPY_BYTES):
            pass
        source.seek(0)
        return source
    copy = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it with the input)
    while block := reader.read(_COPY_BYTES):
        copy.write(block)
    copy.seek(0)
    return copy


@dataclass
class _Spool:
    """One output's rows so far, in a temporary file: its dtype per chunk, and its row shape."""

    file: IO[bytes]
    row_shape: tuple[int, ...]
    segments: list[tuple[int, np.dtype[Any]]]


class NpzPartWriter:
    """An output part as an .npz with one member per model output. Each output's rows are
    spooled to a temporary file as chunks come (a zip holds one member open at a time); the
    zip is written at the end, member by member, with the final row counts in the headers."""

    def __init__(self, directory: Path, output_names: Sequence[str]) -> None:
        self._directory = directory
        self._names = list(output_names)
        self._spools: dict[str, _Spool] = {}
        self.rows = 0

    def write(self, outputs: Mapping[str, np.ndarray[Any, Any]]) -> None:
        """Append a chunk's outputs (every output has the chunk's rows)."""
        for name in self._names:
            array = outputs[name]
            if array.dtype.hasobject:
                # onnxruntime returns string tensors as objects; numpy str arrays need no pickle.
                array = array.astype(str)
            spool = self._spools.get(name)
            if spool is None:
                file = tempfile.TemporaryFile(dir=self._directory, prefix=".npz-")  # noqa: SIM115
                spool = self._spools[name] = _Spool(file, array.shape[1:], [])
            if array.shape[1:] != spool.row_shape:
                raise BatchError(
                    f"output {name!r} changed shape between rows: {list(array.shape[1:])} per "
                    f"row, before {list(spool.row_shape)}"
                )
            spool.file.write(np.ascontiguousarray(array).tobytes())
            spool.segments.append((len(array), array.dtype))
        self.rows += len(next(iter(outputs.values())))

    def finish(self, write: Callable[[bytes], object]) -> None:
        """Write the .npz through `write`, in one pass: zipfile cannot seek back to patch sizes,
        so it streams each member with a data descriptor, and a hash of what passes through
        `write` is the part's sha256."""
        with zipfile.ZipFile(_WriteOnly(write), "w", compression=zipfile.ZIP_STORED) as archive:
            for name in self._names:
                spool = self._spools[name]
                dtype = max((dtype for _, dtype in spool.segments), key=lambda d: d.itemsize)
                info = zipfile.ZipInfo(name + SUFFIX, date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": (self.rows, *spool.row_shape),
                }
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    _copy_segments(spool, dtype, member)

    def discard(self) -> None:
        """Remove the spooled rows."""
        for spool in self._spools.values():
            spool.file.close()


class _WriteOnly:
    """A sink with neither tell nor seek (zipfile then writes in one pass)."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write

    def write(self, data: bytes, /) -> int:
        """Pass the bytes on."""
        self._write(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        """The caller owns the file behind `write`."""


def _copy_segments(spool: _Spool, dtype: np.dtype[Any], out: IO[bytes]) -> None:
    spool.file.seek(0)
    width = math.prod(spool.row_shape)
    for rows, stored in spool.segments:
        data = spool.file.read(rows * width * stored.itemsize)
        if stored != dtype:
            # String outputs: each chunk's width is its longest string; widen to the part's.
            data = np.frombuffer(data, dtype=stored).astype(dtype).tobytes()
        out.write(data)
