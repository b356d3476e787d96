"""`modeldeploy-server gate`: send a golden dataset to a variant and judge its answers.

    modeldeploy-server gate --dataset golden.csv --sha256 HEX --url http://variant:8080 \
        --model-name M [--baseline-url http://stable:8080] [--atol A] [--rtol R] \
        [--min-agreement S] [--verdict verdict.json]

The dataset (http(s)://, file:// or a path) is downloaded and verified by `fetch`'s own code, then
read line by line with the batch input's parsers: a CSV header line and one row per line, or one
JSON object per line. CSV columns named `expected` (a single output) or `expected.<output>` hold
the expected answer; every other column goes to the model. A JSON line is
`{"instance": <records instance>, "expected": <prediction>}` (`expected` optional) or a bare
records instance. Rows go to the variant's records endpoint (`/v1/models/<name>:predict`, the
path user traffic takes) in chunks; each answer is compared with the expected one, or with the
answer of `--baseline-url` for the same rows: exact for labels, integers, strings and booleans,
`|actual - expected| <= atol + rtol * |expected|` for floats. The gate passes when the share of
rows that agree is at least `--min-agreement` (default 1).

With `--model-sha256`, every answer must carry that model digest (the server's `x-model-sha256`
header), so a verdict is bound to one model; the verdict lists the digests that answered.

Writes a verdict JSON (`--verdict`, default stdout) and a one-line summary on stderr. Exit code:
0 passed, 1 failed, 2 could not judge (bad arguments, dataset, digest, an unreachable or
overloaded server).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from modeldeploy_server.batchio import number_lines, parse_csv_line, parse_json_line
from modeldeploy_server.config import parse_sha256
from modeldeploy_server.errors import ServerError
from modeldeploy_server.fetch import FetchError, fetch_model, is_remote
from modeldeploy_server.termination import write_termination_message

PROGRAM = "modeldeploy-server gate"
EXPECTED = "expected"
FORMATS = ("csv", "jsonl")
# A golden dataset is read whole by one Job: far below a model's 2 GiB limit.
MAX_DATASET_BYTES = 256 * 1024 * 1024
# Answers that say "not now" rather than "this row is wrong": the gate cannot judge.
_TRANSIENT = frozenset({429, 502, 503, 504})


class GateError(Exception):
    """Why the gate could not judge (exit code 2), in words."""


@dataclass(frozen=True)
class Tolerance:
    """How close a float answer must be to the expected one; everything else compares exactly."""

    atol: float = 0.0
    rtol: float = 0.0


@dataclass(frozen=True)
class GoldenRow:
    """One dataset row: its line number, what goes to the model, and the expected answer."""

    line: int
    payload: Any  # a records instance (JSON lines) or the CSV fields sent to the model
    expected: Any = None


@dataclass(frozen=True)
class Mismatch:
    """A row whose answer did not agree: its line number, both answers and why."""

    line: int
    reason: str
    expected: Any = None
    actual: Any = None

    def as_json(self) -> dict[str, Any]:
        """The verdict's form."""
        return {
            "line": self.line,
            "reason": self.reason,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass
class Tally:
    """Counts of a gate run so far, and the first mismatches."""

    keep: int
    rows: int = 0
    agreed: int = 0
    failed: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    def add(self, mismatch: Mismatch | None) -> None:
        """Count one row: agreed when there is no mismatch."""
        self.rows += 1
        if mismatch is None:
            self.agreed += 1
            return
        self.failed += 1
        if len(self.mismatches) < self.keep:
            self.mismatches.append(mismatch)

    @property
    def agreement(self) -> float:
        """The share of rows that agree (0 when there are none)."""
        return self.agreed / self.rows if self.rows else 0.0


def compare(expected: Any, actual: Any, tolerance: Tolerance, where: str = "") -> str | None:
    """None when `actual` agrees with `expected`, else the first difference in words.

    An expected object compares only the keys it names (an expected `label` of a model that also
    answers `probabilities` checks the label alone)."""
    at = where or "the answer"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{at}: expected an object, got {_kind(actual)}"
        for key, value in expected.items():
            if key not in actual:
                return f"{at}: no output {key!r}"
            reason = compare(value, actual[key], tolerance, f"{where}.{key}" if where else key)
            if reason is not None:
                return reason
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{at}: expected {len(expected)} values, got {_kind(actual)}"
        for index, (one, other) in enumerate(zip(expected, actual, strict=True)):
            reason = compare(one, other, tolerance, f"{where}[{index}]")
            if reason is not None:
                return reason
        return None
    if _is_number(expected) and _is_number(actual) and float in (type(expected), type(actual)):
        bound = tolerance.atol + tolerance.rtol * abs(expected)
        difference = abs(actual - expected)
        if math.isfinite(difference) and difference <= bound:
            return None
        return f"{at}: {actual!r} differs from {expected!r} by {difference:.6g} > {bound:.6g}"
    if type(expected) is type(actual) and expected == actual:
        return None
    return f"{at}: expected {expected!r}, got {actual!r}"


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} values"
    return "an object" if isinstance(value, dict) else repr(value)


def _cell(text: str) -> Any:
    """An expected CSV cell: a JSON value (number, list, true/false) when it is one, else text."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def read_rows(path: Path, file_format: str) -> tuple[list[str], Iterator[GoldenRow]]:
    """The CSV columns sent to the model (none for JSON lines) and the dataset's rows."""
    handle = path.open("rb")
    lines = number_lines(handle)
    if file_format == "jsonl":
        return [], _json_rows(handle, lines)
    first = next(lines, None)
    if first is None:
        handle.close()
        raise GateError("the dataset is empty: CSV needs a header row")
    try:
        header = parse_csv_line(first[2].removeprefix(b"\xef\xbb\xbf"))
    except ServerError as exc:
        handle.close()
        raise GateError(f"line 1: {exc}") from None
    expected = {
        index: name.removeprefix(EXPECTED).removeprefix(".")
        for index, name in enumerate(header)
        if name == EXPECTED or name.startswith(EXPECTED + ".")
    }
    inputs = [name for index, name in enumerate(header) if index not in expected]
    if not inputs:
        handle.close()
        raise GateError("line 1: the CSV header names no input column")
    return inputs, _csv_rows(handle, lines, header, expected)


def _csv_rows(
    handle: Any,
    lines: Iterator[tuple[int, int, bytes]],
    header: Sequence[str],
    expected: dict[int, str],
) -> Iterator[GoldenRow]:
    with handle:
        for number, _, line in lines:
            if not line.strip():
                continue
            try:
                fields = parse_csv_line(line)
            except ServerError as exc:
                raise GateError(f"line {number}: {exc}") from None
            if len(fields) != len(header):
                raise GateError(
                    f"line {number} has {len(fields)} fields, the header has {len(header)}"
                )
            answer: Any = None
            if expected:
                values = {name: _cell(fields[index]) for index, name in expected.items()}
                answer = values.get("", values)
            payload = [value for index, value in enumerate(fields) if index not in expected]
            yield GoldenRow(number, payload, answer)


def _json_rows(handle: Any, lines: Iterator[tuple[int, int, bytes]]) -> Iterator[GoldenRow]:
    with handle:
        for number, _, line in lines:
            if not line.strip():
                continue
            try:
                document = parse_json_line(line)
            except ServerError as exc:
                raise GateError(f"line {number}: {exc}") from None
            if isinstance(document, dict) and "instance" in document:
                yield GoldenRow(number, document["instance"], document.get(EXPECTED))
            else:
                yield GoldenRow(number, document)


def chunked(rows: Iterator[GoldenRow], size: int) -> Iterator[list[GoldenRow]]:
    """Consecutive rows, `size` at a time."""
    chunk: list[GoldenRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Endpoint:
    """A variant's records endpoint and how to send it rows."""

    client: httpx.Client
    url: str
    inputs: Sequence[str]  # CSV columns; empty for JSON lines
    # The model digest every answer must come from (the server's x-model-sha256), if any.
    model_sha256: str | None = None
    # The digests that did answer.
    answered_by: set[str] = field(default_factory=set)
    # Sent with every request besides the content type (the probe's variant and probe headers).
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self, rows: Sequence[GoldenRow]) -> tuple[bytes, str]:
        """The request body for the rows and its content type."""
        if not self.inputs:
            instances = [row.payload for row in rows]
            return orjson.dumps({"instances": instances}), "application/json"
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.inputs)
        writer.writerows(row.payload for row in rows)
        return buffer.getvalue().encode(), "text/csv"

    def predict(self, rows: Sequence[GoldenRow]) -> list[Any] | str:
        """One prediction per row, or the server's refusal of the rows in words."""
        content, content_type = self.body(rows)
        try:
            response = self.client.post(
                self.url,
                content=content,
                headers={
                    **self.headers,
                    "content-type": content_type,
                    "accept": "application/json",
                },
            )
        except httpx.HTTPError as exc:
            raise GateError(f"{self.url}: {exc or type(exc).__name__}") from None
        if response.status_code in _TRANSIENT:
            raise GateError(f"{self.url} answered HTTP {response.status_code}: {_text(response)}")
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {_text(response)}"
        digest = response.headers.get("x-model-sha256", "")
        if self.model_sha256 is not None and digest != self.model_sha256:
            raise GateError(
                f"{self.url} answered with model sha256 {digest or '(none)'}, expected "
                f"{self.model_sha256}: another model is serving there"
            )
        self.answered_by.add(digest)
        try:
            predictions = orjson.loads(response.content)["predictions"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise GateError(f"{self.url} answered 200 without a predictions list") from None
        if not isinstance(predictions, list) or len(predictions) != len(rows):
            raise GateError(f"{self.url} answered a predictions list not one per row")
        return predictions

    def predict_rows(self, rows: Sequence[GoldenRow]) -> list[Any | str]:
        """Each row's prediction, or why the server refused that row (rows alone when the chunk
        as a whole was refused)."""
        answer = self.predict(rows)
        if not isinstance(answer, str):
            return answer
        if len(rows) == 1:
            return [_Refused(answer)]
        return [self.predict_rows([row])[0] for row in rows]


class _Refused(str):
    """The server's refusal of one row (a string subclass, so that it never equals an answer)."""


def _only(answer: Any, outputs: Sequence[str]) -> Any:
    """The named outputs of a multi-output answer (others, and refusals, as they are)."""
    if not isinstance(answer, dict):
        return answer
    return {name: answer[name] for name in outputs if name in answer}


def _text(response: httpx.Response) -> str:
    try:
        error = orjson.loads(response.content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    return str(error if error is not None else response.text[:200])


def judge_chunk(
    rows: Sequence[GoldenRow],
    candidate: Sequence[Any],
    reference: Sequence[Any] | None,
    tolerance: Tolerance,
    tally: Tally,
    outputs: Sequence[str] = (),
) -> None:
    """Count a chunk's rows: the candidate's answers against the expected or reference ones."""
    for index, row in enumerate(rows):
        actual = candidate[index]
        expected = row.expected if reference is None else reference[index]
        if outputs and not isinstance(actual, _Refused):
            actual, expected = _only(actual, outputs), _only(expected, outputs)
        if isinstance(actual, _Refused):
            tally.add(Mismatch(row.line, f"the candidate refused the row: {actual}", expected))
            continue
        if isinstance(expected, _Refused):
            raise GateError(f"line {row.line}: the baseline refused the row: {expected}")
        if expected is None:
            raise GateError(f"line {row.line} has no expected answer (give --baseline-url)")
        reason = compare(expected, actual, tolerance)
        tally.add(None if reason is None else Mismatch(row.line, reason, expected, actual))


@dataclass(frozen=True)
class GateConfig:
    """One gate run, validated."""

    dataset: str
    sha256: str | None
    url: str
    model_name: str
    baseline_url: str | None = None
    file_format: str = "csv"
    tolerance: Tolerance = Tolerance()
    min_agreement: float = 1.0
    batch_rows: int = 64
    max_mismatches: int = 10
    timeout_s: float = 30.0
    outputs: tuple[str, ...] = ()  # compare only these outputs (default: every output)
    model_sha256: str | None = None  # the candidate's model digest every answer must come from


def records_url(base: str, model_name: str) -> str:
    """The records endpoint of a variant's (or router's) base URL."""
    return f"{base.rstrip('/')}/v1/models/{model_name}:predict"


def fetch_dataset(
    uri: str, sha256: str | None, workdir: Path, timeout_s: float
) -> tuple[Path, str]:
    """Download and verify a dataset into workdir: its local path and its sha256."""
    local = workdir / "dataset"
    try:
        return local, fetch_model(uri, local, sha256, timeout_s, MAX_DATASET_BYTES)
    except FetchError as exc:
        raise GateError(str(exc)) from None


def run_gate(config: GateConfig, workdir: Path) -> dict[str, Any]:
    """Download and verify the dataset into workdir, send it, and return the verdict."""
    local, actual_sha256 = fetch_dataset(config.dataset, config.sha256, workdir, config.timeout_s)
    inputs, rows = read_rows(local, config.file_format)
    tally = Tally(config.max_mismatches)
    timeout = httpx.Timeout(config.timeout_s)
    with httpx.Client(timeout=timeout) as client:
        candidate = Endpoint(
            client, records_url(config.url, config.model_name), inputs, config.model_sha256
        )
        baseline = (
            None
            if config.baseline_url is None
            else Endpoint(client, records_url(config.baseline_url, config.model_name), inputs)
        )
        for chunk in chunked(rows, config.batch_rows):
            answers = candidate.predict_rows(chunk)
            reference = None if baseline is None else baseline.predict_rows(chunk)
            judge_chunk(chunk, answers, reference, config.tolerance, tally, config.outputs)
    if tally.rows == 0:
        raise GateError(f"{config.dataset} has no data rows")
    return verdict(config, actual_sha256, sorted(candidate.answered_by), tally)


def verdict(
    config: GateConfig, dataset_sha256: str, answered_by: list[str], tally: Tally
) -> dict[str, Any]:
    """The verdict document: deterministic for the same answers."""
    return {
        "passed": tally.agreement >= config.min_agreement,
        "rows": tally.rows,
        "agreed": tally.agreed,
        "mismatched": tally.failed,
        "agreement": round(tally.agreement, 6),
        "minAgreement": config.min_agreement,
        "tolerance": {"atol": config.tolerance.atol, "rtol": config.tolerance.rtol},
        "dataset": {"uri": config.dataset, "sha256": dataset_sha256},
        "candidate": {"url": config.url, "model": config.model_name, "modelSha256": answered_by},
        "against": "expected" if config.baseline_url is None else config.baseline_url,
        "outputs": list(config.outputs),
        "mismatches": [mismatch.as_json() for mismatch in tally.mismatches],
    }


def summary(document: dict[str, Any]) -> str:
    """The verdict in one line."""
    outcome = "passed" if document["passed"] else "FAILED"
    against = document["against"]
    return (
        f"gate {outcome}: {document['agreed']}/{document['rows']} rows agree "
        f"({100 * document['agreement']:.1f}%, need {100 * document['minAgreement']:.1f}%) "
        f"against {'the expected answers' if against == 'expected' else against}"
    )


def add_dataset_arguments(parser: argparse.ArgumentParser, url_help: str) -> None:
    """The arguments `gate` and `probe` share: the dataset, where to send it, the model name."""
    parser.add_argument("--dataset", required=True, help="CSV or JSON lines: http(s)://, file://")
    parser.add_argument("--sha256", help="the dataset's sha256; required for http(s)://")
    parser.add_argument("--format", choices=FORMATS, help="csv or jsonl (default: by extension)")
    parser.add_argument("--url", required=True, help=url_help)
    parser.add_argument("--model-name", required=True, help="the served model's name")


def parse_dataset_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """The parsed arguments; a remote dataset without its sha256 is an error (exit 2)."""
    args = parser.parse_args(list(argv))
    if args.sha256 is None and is_remote(args.dataset):
        parser.error(f"--sha256 is required for {args.dataset}")
    return args


def dataset_format(dataset: str, named: str | None) -> str:
    """The dataset's format: the one named, else by its extension (JSON lines or CSV)."""
    return named or ("jsonl" if dataset.endswith((".jsonl", ".ndjson")) else "csv")


def _sha256(value: str) -> str:
    try:
        return parse_sha256(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0 or not math.isfinite(number):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def parse_gate_config(argv: Sequence[str]) -> tuple[GateConfig, Path | None, Path | None]:
    """The run's configuration, where to write the verdict (None: stdout) and the termination
    message (None: nowhere)."""
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server gate",
        description="Send a golden dataset to a variant and judge its answers.",
    )
    add_dataset_arguments(parser, "the candidate variant's base URL")
    parser.add_argument(
        "--model-sha256",
        type=_sha256,
        help="every candidate answer must come from this model digest (x-model-sha256)",
    )
    parser.add_argument("--baseline-url", help="compare with this variant's answers instead")
    parser.add_argument(
        "--compare", action="append", default=[], help="compare only this output (repeatable)"
    )
    parser.add_argument("--atol", type=_non_negative, default=0.0, help="absolute float tolerance")
    parser.add_argument("--rtol", type=_non_negative, default=0.0, help="relative float tolerance")
    parser.add_argument(
        "--min-agreement", type=_fraction, default=1.0, help="share of rows that must agree"
    )
    parser.add_argument("--batch-rows", type=_positive, default=64, help="rows per request")
    parser.add_argument("--max-mismatches", type=_positive, default=10, help="mismatches listed")
    parser.add_argument("--timeout-s", type=_non_negative, default=30.0, help="per request (s)")
    parser.add_argument("--verdict", type=Path, help="write the verdict JSON here (default stdout)")
    parser.add_argument(
        "--termination-message-path",
        type=Path,
        help="also write the verdict (or the error) here, within 4096 bytes (a Job's outcome)",
    )
    args = parse_dataset_arguments(parser, argv)
    if not args.timeout_s > 0:
        parser.error("--timeout-s must be positive")
    config = GateConfig(
        dataset=args.dataset,
        sha256=args.sha256,
        url=args.url,
        model_name=args.model_name,
        baseline_url=args.baseline_url,
        file_format=dataset_format(args.dataset, args.format),
        tolerance=Tolerance(args.atol, args.rtol),
        min_agreement=args.min_agreement,
        batch_rows=args.batch_rows,
        max_mismatches=args.max_mismatches,
        timeout_s=args.timeout_s,
        outputs=tuple(args.compare),
        model_sha256=args.model_sha256,
    )
    return config, args.verdict, args.termination_message_path


def main(argv: list[str]) -> int:
    """Entry point of `modeldeploy-server gate`: 0 passed, 1 failed, 2 could not judge."""
    config, verdict_path, message_path = parse_gate_config(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="modeldeploy-gate-") as workdir:
            document = run_gate(config, Path(workdir))
    except GateError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        error = {"error": str(exc)[:1024]}
        write_termination_message(message_path, error, error, PROGRAM)
        return 2
    shorter = {**document, "mismatches": [], "mismatchesOmitted": len(document["mismatches"])}
    write_termination_message(message_path, document, shorter, PROGRAM)
    data = orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    if verdict_path is None:
        sys.stdout.buffer.write(data)
    else:
        try:
            verdict_path.write_bytes(data)
        except OSError as exc:
            print(f"{PROGRAM}: error: cannot write {verdict_path}: {exc}", file=sys.stderr)
            return 2
    print(summary(document), file=sys.stderr)
    return 0 if document["passed"] else 1
